"""Decoder and distill checkpoints, written through the one `CheckpointManager` (training/checkpoint.py): a temp
dir renamed into place, a manifest with every file's sha256 written last, `latest` replaced after the rename,
keep-last-N, and a fallback to the newest valid checkpoint when `latest` is partial or corrupt.

    <dir>/step_000120/{model,ema}.safetensors        tensor dicts
    <dir>/step_000120/state/<name>.json(+.safetensors)  other objects (optimizer, scheduler, RNG, data position;
                                                     training/state_file.py: nothing that can execute code on load)
    <dir>/step_000120/per_rank/rankNNNNN.json(+...)  each rank's own state (generator, ZeRO optimizer partition)
    <dir>/step_000120/meta.json                     what `decode_tokens` needs (decoder config, sampler, steps)
    <dir>/step_000120/manifest.json, <dir>/latest

`save` is collective when torch.distributed is initialised (every rank calls it; rank 0 writes the replicated
state, and each rank's own `state["per_rank"]` goes to per_rank/rankNNNNN.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.checkpoint import CheckpointManager, rank_world
from training.state_file import read_state, state_exists, write_state


def _is_tensor_dict(v) -> bool:
    return isinstance(v, dict) and len(v) > 0 and all(isinstance(x, torch.Tensor) for x in v.values())


class _StateWriter:
    """The manager's writer for a stage whose state is a dict of tensor dicts and plain objects."""

    @staticmethod
    def save(ckpt_dir: Path, state: dict) -> None:
        rank, _ = rank_world()
        if state.get("per_rank") is not None:
            write_state(ckpt_dir / "per_rank" / f"rank{rank:05d}", state["per_rank"])
        if rank != 0:
            return
        for name, value in state.items():
            if name in ("meta", "per_rank") or value is None:
                continue
            if _is_tensor_dict(value):
                save_file({k: v.detach().contiguous().cpu() for k, v in value.items()}, str(ckpt_dir / f"{name}.safetensors"))
            else:
                write_state(ckpt_dir / "state" / name, value)
        (ckpt_dir / "meta.json").write_text(json.dumps(state.get("meta", {}), indent=1, default=str))


def save(directory: str | Path, step: int, state: dict, keep_last: int = 0) -> Path:
    """state: {name: tensor dict -> safetensors | 'meta': json-able dict | 'per_rank': this rank's own object |
    other -> state/<name>.json}. keep_last=0 keeps every checkpoint."""
    meta = dict(state.get("meta", {}), step=step)
    return CheckpointManager(root=Path(directory), keep_last=keep_last).save(_StateWriter(), step, {**state, "meta": meta})


def load(path: str | Path) -> dict:
    """A step dir -> {name: tensors or object, 'meta': dict, 'per_rank': this rank's object if saved}."""
    path = Path(path)
    state: dict = {"meta": json.loads((path / "meta.json").read_text())}
    for f in sorted(path.glob("*.safetensors")):
        state[f.stem] = load_file(str(f))
    for f in sorted((path / "state").glob("*.json")):
        state[f.stem] = read_state(f.with_suffix(""))
    mine = path / "per_rank" / f"rank{rank_world()[0]:05d}"
    if state_exists(mine):
        state["per_rank"] = read_state(mine)
    return state


def latest_path(directory: str | Path, collective: bool = False) -> Path | None:
    """The newest valid step dir (`latest` if it verifies). collective=True: all ranks agree (see the manager)."""
    return CheckpointManager(root=Path(directory)).latest_valid(collective=collective)


def load_latest(directory: str | Path, collective: bool = False) -> tuple[int, dict] | None:
    path = latest_path(directory, collective)
    if path is None:
        return None
    state = load(path)
    return int(state["meta"]["step"]), state
