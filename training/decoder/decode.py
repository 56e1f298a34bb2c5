"""A trained decoder at inference: its checkpoint meta, loading it back, and VQ token grids -> pixels.

Kept apart from train.py so that whatever only decodes (evals, `release.load_weights` of one of our own
checkpoints, benchmarks) needs neither the training loop nor its engines, and train.py can import release.py.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from training.decoder import checkpoint
from training.decoder.config import DecoderConfig
from training.decoder.latent import build_latent, latent_shape
from training.decoder.samplers import euler_sample, turbo_sample
from training.decoder.sigvq import TokenDecoder


def decoder_meta(dcfg, sampler: str, steps: int, extra: dict | None = None) -> dict:
    """What `decode_tokens` needs to rebuild and run a checkpoint without the run's config."""
    return {"decoder": asdict(dcfg), "sampler": sampler, "steps": steps, **(extra or {})}


def load_decoder(source, use_ema: bool = True) -> tuple[TokenDecoder, dict]:
    """A TokenDecoder from a checkpoint dir (its `latest` step, or a step dir) plus the checkpoint's meta."""
    path = Path(source)
    step_dir = path if (path / "meta.json").exists() else checkpoint.latest_path(path)
    if step_dir is None:
        raise FileNotFoundError(f"no decoder checkpoint in {source} (expected step_N/ and latest)")
    state = checkpoint.load(step_dir)
    meta = state["meta"]
    model = TokenDecoder(DecoderConfig(**meta["decoder"]))
    model.load_state_dict(state["ema" if use_ema and "ema" in state else "model"])
    return model.eval(), meta


@torch.no_grad()
def decode_tokens(decoder, grid_ids: torch.Tensor, steps: int | None = None, cfg_scale: float | None = None,
                  seed: int = 0, sampler: str | None = None, noise: torch.Tensor | None = None,
                  stochast_ratio: float = 1.0) -> torch.Tensor:
    """VQ id grids [B, gh, gw] -> images [B, 3, H, W] in [-1, 1].

    decoder: a checkpoint dir or a TokenDecoder. A checkpoint's meta chooses the sampler (teacher: Euler ODE with
    shift and CFG; distilled student: turbo) and the default steps; `steps`/`cfg_scale`/`sampler` override them.
    stochast_ratio: turbo re-noising, 1 = fresh noise (released), 0 = the model's own noise estimate (deterministic).
    """
    meta = {}
    if not isinstance(decoder, torch.nn.Module):
        decoder, meta = load_decoder(decoder)
    d = decoder.cfg
    sampler = sampler or meta.get("sampler", d.sampler)
    steps = steps or meta.get("steps", d.steps)
    cfg_scale = d.cfg_scale if cfg_scale is None else cfg_scale
    gen = torch.Generator().manual_seed(seed)
    shape = (grid_ids.shape[0], *latent_shape(d))
    z = noise if noise is not None else torch.randn(shape, generator=gen)
    decoder.eval()
    if sampler == "turbo":
        x = turbo_sample(decoder, z, grid_ids, steps, generator=gen, stochast_ratio=stochast_ratio, cfg_scale=cfg_scale)
    else:
        x = euler_sample(decoder, z, grid_ids, steps, d.sample_shift, cfg_scale, d.cfg_norm_clip)
    return build_latent(d).decode(x)
