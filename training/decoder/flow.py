"""Rectified flow, in the release's convention: x_t = t * x_data + (1 - t) * noise, t=0 noise, t=1 data.

The network predicts the velocity u = x_data - noise. From (x_t, t, u) the clean and noise estimates are
x1_hat = x_t + (1 - t) * u and x0_hat = x_t - t * u (used by the turbo sampler and the distillation targets).
"""
from __future__ import annotations

import math

import torch


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Released `time_shifting_factor`: t' = t / (t + s - s t). s > 1 moves t toward noise (t=0)."""
    return t / (t + shift - shift * t)


def resolution_shift(n_tokens: int) -> float:
    """Resolution-dependent shift exp(mu), mu linear from (256 tokens, 0.5) to (4096 tokens, 1.15), as released."""
    mu = 0.5 + (1.15 - 0.5) * (n_tokens - 256) / (4096 - 256)
    return math.exp(mu)


def sample_t(n: int, cfg, n_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times: logit-normal (or uniform), then shifted toward noise like the sampler's grid."""
    if cfg.t_sampling == "logit_normal":
        t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, generator=generator))
    else:
        t = torch.rand(n, generator=generator)
    shift = cfg.train_shift if cfg.train_shift > 0 else resolution_shift(n_tokens)
    return time_shift(t, shift)


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (x1.dim() - 1)))
    return tt * x1 + (1 - tt) * x0


def clean_estimate(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x + (1 - t.view(-1, *([1] * (x.dim() - 1)))) * u


def noise_estimate(x: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x - t.view(-1, *([1] * (x.dim() - 1))) * u


def flow_loss(model, x1: torch.Tensor, ids: torch.Tensor, cfg, generator: torch.Generator | None = None):
    """Per-batch velocity MSE. cfg: DecoderConfig (t sampling, shift, condition dropout)."""
    b = x1.shape[0]
    n_tokens = (x1.shape[-2] // cfg.patch_size) * (x1.shape[-1] // cfg.patch_size)
    t = sample_t(b, cfg, n_tokens, generator).to(x1.device)
    x0 = torch.randn(x1.shape, generator=generator).to(x1)
    keep = torch.rand(b, generator=generator) >= cfg.cond_drop
    u = model(interpolate(x1, x0, t), t, ids, keep.to(x1.device))
    return (u.float() - (x1 - x0).float()).pow(2).mean()
