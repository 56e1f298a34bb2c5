"""Forward (noising) process of masked diffusion: schedules, t sampling, masking, complementary masks.

A schedule maps time t in (0, 1] to the mask probability 1 - alpha_t and to the ELBO weight
-alpha'_t / (1 - alpha_t) of MDLM / LLaDA2.0 Eq. 1:
  linear: alpha_t = 1 - t           -> mask prob t,                weight 1/t
  cosine: alpha_t = cos(pi t / 2)    -> mask prob 1 - cos(pi t / 2), weight (pi/2) sin(pi t/2) / (1 - cos(pi t/2))
"""
from __future__ import annotations

import math

import torch


def mask_prob(schedule: str, t: torch.Tensor) -> torch.Tensor:
    if schedule == "linear":
        return t
    if schedule == "cosine":
        return 1.0 - torch.cos(0.5 * math.pi * t)
    raise ValueError(f"diffusion.schedule={schedule} is not known: linear | cosine")


def time_from_mask_prob(schedule: str, p: torch.Tensor) -> torch.Tensor:
    """Inverse of `mask_prob` (used for the complementary half, whose mask probability is 1 - p)."""
    if schedule == "linear":
        return p
    if schedule == "cosine":
        return torch.acos((1.0 - p).clamp(-1.0, 1.0)) * (2.0 / math.pi)
    raise ValueError(f"diffusion.schedule={schedule} is not known: linear | cosine")


def elbo_weight(schedule: str, t: torch.Tensor) -> torch.Tensor:
    if schedule == "linear":
        return 1.0 / t
    if schedule == "cosine":
        half = 0.5 * math.pi * t
        return 0.5 * math.pi * torch.sin(half) / (1.0 - torch.cos(half))
    raise ValueError(f"diffusion.schedule={schedule} is not known: linear | cosine")


def sample_t(shape, low: float, high: float, eps: float, stratified: bool, device,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U[low, high] clipped below at eps. Stratified (MDLM's low-discrepancy sampler): the n draws are
    (i + u) / n for one u, shuffled, so every batch covers the whole range; each draw is still marginally uniform."""
    n = math.prod(shape)
    if stratified:
        u = torch.rand((), device=device, generator=generator)
        order = torch.randperm(n, device=device, generator=generator)
        unit = (order.to(torch.float32) + u) / n
    else:
        unit = torch.rand(n, device=device, generator=generator)
    t = low + (high - low) * unit
    return t.clamp(min=eps).reshape(shape)


def per_token_t(t: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """t [B] (one per sample) or [B, nblocks] (one per block) -> [B, seq_len]."""
    if t.dim() == 1:
        return t[:, None].expand(-1, seq_len)
    return t.repeat_interleave(block_size, dim=1)[:, :seq_len]


def draw_mask(maskable: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent Bernoulli(p) per maskable position -> bool [B, L]."""
    u = torch.rand(maskable.shape, device=maskable.device, generator=generator)
    return (u < p) & maskable


def complementary_mask(masked: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """The inverse mask within the maskable positions: with the original, every maskable position is masked
    exactly once across the pair (LLaDA2.0 SFT), so every token gets a loss signal from the pair."""
    return maskable & ~masked


def apply_mask(input_ids: torch.Tensor, masked: torch.Tensor, mask_id: int) -> torch.Tensor:
    return torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)


def trajectory_mask(reveal: torch.Tensor, block_size: int, generator: torch.Generator | None = None):
    """Path distillation's noising (dFactory's compressed transitions s_i -> s_j): reveal [B, L] is a sampler
    trajectory (0: context, k + 1: accepted at the k-th denoising step of its block; data_pipeline/packing.py).
    Per block a cut c ~ U{0 .. its last step}: the block after c steps (tokens revealed at steps < c clean, the rest
    masked) is a state the sampler was in, and every token it revealed later is a target, so one forward learns
    the whole jump. -> (masked [B, L], t [B, L] = the block's masked fraction of its generated tokens)."""
    bsz, length = reveal.shape
    nb = -(-length // block_size)
    r = torch.nn.functional.pad(reveal, (0, nb * block_size - length)).view(bsz, nb, block_size)
    steps = r.amax(-1)  # 1 + the block's last step; 0 = nothing generated in it
    cut = (torch.rand((bsz, nb), device=reveal.device, generator=generator) * steps).floor()
    masked = (r > 0) & (r - 1 >= cut[..., None])
    frac = masked.sum(-1) / (r > 0).sum(-1).clamp(min=1)
    t = frac[..., None].expand(-1, -1, block_size).reshape(bsz, -1)[:, :length]
    return masked.reshape(bsz, -1)[:, :length], t
