"""Decoder samplers: the teacher's Euler ODE with CFG, and the student's "predict clean, re-noise" (turbo).

Both call `model(x, t, ids, keep)` (a `TokenDecoder`). Noise is drawn from an explicit torch.Generator, so a run
is reproducible and a teacher and a student can start from the same noise.
"""
from __future__ import annotations

import torch

from training.decoder.flow import clean_estimate, noise_estimate, time_shift


def guided_velocity(model, x, t, ids, cfg_scale: float = 1.0, norm_clip: bool = True, fast_path: bool = True):
    """pred = u + w (c - u), u from the null (all-zero) condition; w=1 is the conditional prediction.

    The released decoder writes this as c + s (c - u) with s = w - 1 (its default s=1.0 is w=2.0) and clips
    ||pred|| to ||c|| per sample when it is larger. fast_path skips the null pass when w == 1.
    """
    b = x.shape[0]
    if cfg_scale == 1.0 and fast_path:
        return model(x, t, ids, torch.ones(b, dtype=torch.bool, device=x.device)).float()
    keep = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(x.device)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ids, ids]), keep).float()
    c, u = out[:b], out[b:]
    pred = u + cfg_scale * (c - u)
    if norm_clip:
        cn = c.flatten(1).norm(dim=1)
        pn = pred.flatten(1).norm(dim=1)
        factor = torch.where(pn > cn, cn / pn.clamp_min(1e-12), torch.ones_like(pn))
        pred = pred * factor.view(-1, *([1] * (pred.dim() - 1)))
    return pred


def euler_grid(steps: int, shift: float) -> torch.Tensor:
    """steps+1 times from 0 (noise) to 1 (data), shifted toward noise. (Release: linspace(0,1,50) = 49 steps.)"""
    return time_shift(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift).float()


@torch.no_grad()
def euler_sample(model, noise, ids, steps: int, shift: float, cfg_scale: float = 1.0, norm_clip: bool = True):
    """Teacher sampler: Euler ODE over the shifted grid; returns the t=1 sample."""
    x = noise.float()
    grid = euler_grid(steps, shift).tolist()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t0, device=x.device)
        x = x + (t1 - t0) * guided_velocity(model, x, t, ids, cfg_scale, norm_clip)
    return x


def turbo_grid(steps: int) -> list[float]:
    """Student times: uniform, unshifted (released decoder-turbo)."""
    return [k / steps for k in range(steps)]


@torch.no_grad()
def turbo_sample(model, noise, ids, steps: int, generator: torch.Generator | None = None,
                 stochast_ratio: float = 1.0, cfg_scale: float = 1.0):
    """Predict clean, re-noise: x1_hat from v, then x <- t' x1_hat + (1 - t') eps at the next time.

    eps is fresh Gaussian noise (stochast_ratio=1, released) or mixes in the model's own noise estimate
    sqrt(1-r) x0_hat + sqrt(r) eps for r < 1 (r = 0 is deterministic, DDIM-like).
    """
    x = noise.float()
    grid = turbo_grid(steps) + [1.0]
    for k in range(steps):
        t = torch.full((x.shape[0],), grid[k], device=x.device)
        v = guided_velocity(model, x, t, ids, cfg_scale)
        x1 = clean_estimate(x, t, v)
        if k == steps - 1:
            return x1
        fresh = torch.randn(x.shape, generator=generator).to(x)
        eps = fresh if stochast_ratio >= 1.0 else \
            (1 - stochast_ratio) ** 0.5 * noise_estimate(x, t, v) + stochast_ratio ** 0.5 * fresh
        x = grid[k + 1] * x1 + (1 - grid[k + 1]) * eps
    return x
