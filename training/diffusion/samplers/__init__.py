"""Diffusion samplers: block decoding over a KV cache for text, CFG text-to-image and editing; their knobs travel
as one `SamplerSettings`."""
from training.diffusion.samplers.decode import DecodeResult, decode_blocks, left_pad
from training.diffusion.samplers.image import ImageResult, edit_image, generate_image
from training.diffusion.samplers.settings import SamplerSettings
from training.diffusion.samplers.text import generate_text

__all__ = ["DecodeResult", "ImageResult", "SamplerSettings", "decode_blocks", "edit_image", "generate_image",
           "generate_text", "left_pad"]
