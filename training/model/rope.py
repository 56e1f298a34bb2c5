"""Partial 1-D rotary embedding: the first `rotary_dim` dims of each head rotate (rotate-half convention),
the rest pass through. Images get plain 1-D positions too (the release has no 2-D RoPE)."""
from __future__ import annotations

import torch


def rope_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """position_ids [B, L] -> cos, sin [B, 1, L, rotary_dim], computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32)
                                / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; rotates x[..., :rotary_dim] where rotary_dim = cos.shape[-1]."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat([x_rot, x_pass], dim=-1)
