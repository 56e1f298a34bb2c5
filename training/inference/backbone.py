"""One loader for a trained backbone, used by `unidiff generate`, `unidiff eval` and the harness adapters.

A source is an HF-format dir (config.json + safetensors, either public layout), a framework checkpoint step dir
of any engine or layout (read without an engine or a process group), or empty: the latest valid checkpoint of the
run dir. One full replica per process: evals split items, not the model.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from training import accelerator
from training.config_errors import ConfigError


def resolve_source(cfg, source: str | Path | None) -> Path:
    """The dir to load: `source`, or the run's latest valid checkpoint when it is empty."""
    if source:
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"backbone checkpoint {path} does not exist: pass a checkpoint step dir or an HF-format "
                              f"dir (config.json + safetensors)")
        return path
    from training.checkpoint import CheckpointManager

    found = CheckpointManager(cfg.run_dir).latest_valid()  # it appends checkpoints/ itself
    if found is None:
        raise ConfigError(f"no valid checkpoint under {Path(cfg.run_dir) / 'checkpoints'}: train first, or name one "
                          f"(generate --checkpoint DIR, eval.checkpoint=DIR; a step dir or an HF-format dir)")
    return Path(found)


def load_backbone(cfg, source: str | Path | None = "", device=None, dtype: torch.dtype | None = None):
    """-> (model in eval mode on `device`, the dir it came from). device: default this rank's (cuda:LOCAL_RANK
    or cpu); dtype: default `accelerator.inference_dtype(device)`."""
    device = torch.device(device or accelerator.device_for(int(os.environ.get("LOCAL_RANK", "0"))))
    dtype = dtype or accelerator.inference_dtype(device)
    path = resolve_source(cfg, source)
    if (path / "config.json").exists():
        from training.hf_format import import_hf

        return import_hf(path, device=str(device), dtype=dtype, base=cfg.model)[1].eval(), str(path)
    from training.adapters import merged_state_dict
    from training.hf_format import cast_model
    from training.model import build_model

    model = build_model(cfg.model, device)
    state = merged_state_dict(path)  # a LoRA run's adapters folded into its base
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("optim.")}, strict=True)
    return cast_model(model, dtype).eval(), str(path)
