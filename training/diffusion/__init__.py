"""Masked / block diffusion: noising, attention masks, the loss, and the samplers."""
from training.diffusion.config import DiffusionConfig
from training.diffusion.masks import block_diffusion_mask
from training.diffusion.objective import corrupt, diffusion_loss

__all__ = ["DiffusionConfig", "block_diffusion_mask", "corrupt", "diffusion_loss"]
