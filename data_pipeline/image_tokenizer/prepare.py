"""Image -> the tokenizer's pixel values -> VQ ids: the one recipe of every caller (pretokenize, fit-codebook,
decoder training pairs, eval held-out items, the harness adapters, `unidiff generate`).

Two modes, as released: `understand` (images in a prompt: smart resize to the factor lattice within the pixel
bounds) and `generate` (generation targets and editing sources: var_center_crop on the factor lattice with at most
gen_max_patches cells, scaled to cover). The sizes come from `data.image_tokenizer`; the normalisation is the
tokenizer's own mean/std (its preprocessor_config.json), never a default: a caller that normalises with 0.5/0.5
while training data used the tokenizer's values gets other ids for the same image (a train/eval skew).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image

from data_pipeline.image_tokenizer.preprocess import (generate_crop_size_list, resize_for_understanding,
                                                      to_pixel_values, var_center_crop)

MODES = ("understand", "generate")


@lru_cache(maxsize=8)
def _generation_sizes(num_patches: int, factor: int) -> tuple[tuple[int, int], ...]:
    return tuple(generate_crop_size_list(num_patches, factor))


def resize(img: Image.Image, icfg, mode: str) -> Image.Image:
    """The size part of the recipe: RGB image at the size the tokenizer sees in this mode."""
    if mode == "understand":
        return resize_for_understanding(img, icfg.resize_factor, icfg.min_pixels, icfg.max_pixels)
    if mode == "generate":
        return var_center_crop(img, list(_generation_sizes(icfg.gen_max_patches, icfg.resize_factor)), scale=True)
    raise ValueError(f"image mode {mode!r} is not known: {' | '.join(MODES)}")


def pixel_values(img: Image.Image, tokenizer) -> torch.Tensor:
    """An already sized image -> [3, H, W] normalised with the tokenizer's own mean/std."""
    return to_pixel_values(img, tokenizer.mean, tokenizer.std)


def sized_image(img: Image.Image, tokenizer, icfg, mode: str) -> Image.Image:
    """`resize`, after checking the configured lattice fits the tokenizer's patches."""
    if icfg.resize_factor % tokenizer.patch_size:
        raise ValueError(f"data.image_tokenizer.resize_factor={icfg.resize_factor} is not a multiple of the image "
                         f"tokenizer's patch_size={tokenizer.patch_size}: set it to a multiple (released: 2 x patch)")
    return resize(img, icfg, mode)


def prepare_pixels(img: Image.Image, tokenizer, icfg, mode: str) -> torch.Tensor:
    """Image -> the tokenizer's pixel values [3, H, W] for this mode (batch them with `tokenizer.encode_images`)."""
    return pixel_values(sized_image(img, tokenizer, icfg, mode), tokenizer)


def tokenize_image(img: Image.Image, tokenizer, icfg, mode: str) -> tuple[Image.Image, torch.Tensor]:
    """Image -> (the sized RGB image the ids describe, VQ ids [gh, gw] on the CPU). A decoder's target pixels are
    `to_pixel_values(sized)` ([-1, 1]), whatever the tokenizer's normalisation."""
    sized = sized_image(img, tokenizer, icfg, mode)
    return sized, tokenizer.encode_images([pixel_values(sized, tokenizer)])[0]
