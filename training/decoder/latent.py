"""Latent spaces the decoder's flow lives in: pixels (toy scale) or a VAE loaded from a local path (real scale).

Both map images in [-1, 1], [B, 3, H, W], to the flow's data space and back. The VAE space is the release's:
FLUX `AutoencoderKL` (16 channels, /8), z = (mean - shift) * scale, decoded as z / scale + shift. diffusers is an
optional dependency, imported only when `decoder.latent=vae`; nothing is downloaded (local folder only).
"""
from __future__ import annotations

from pathlib import Path

import torch


class PixelLatent:
    channels, downsample = 3, 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp(-1, 1)


class VAELatent:
    downsample = 8

    def __init__(self, path: str, scale: float, shift: float, device="cpu"):
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:  # optional dependency: only real-scale runs need it
            raise ImportError("decoder.latent=vae needs the optional package `diffusers` (pip install diffusers); "
                              "or use decoder.latent=pixel") from e
        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"decoder.vae_path={path} has no config.json; give a local AutoencoderKL folder")
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        self.channels = self.vae.config.latent_channels
        self.scale, self.shift = scale, shift

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(images).latent_dist.mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scale + self.shift).sample.clamp(-1, 1)


def build_latent(cfg, device="cpu"):
    if cfg.latent == "pixel":
        return PixelLatent()
    return VAELatent(cfg.vae_path, cfg.vae_scaling_factor, cfg.vae_shift_factor, device)


def latent_shape(cfg) -> tuple[int, int, int]:
    down = 1 if cfg.latent == "pixel" else 8
    return cfg.in_channels, cfg.image_size // down, cfg.image_size // down
