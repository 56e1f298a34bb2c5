"""Small atomic checkpoints for the decoder: `save(dir, step, state)` / `load_latest(dir)`.

Layout: <dir>/step_<N>/{<name>.safetensors for each tensor dict, state/<name>.json(+.safetensors) for other objects
(optimizer and scheduler state: training/state_file.py, nothing that can execute code on load), meta.json}
and <dir>/latest (text: "step_<N>"). A step is written into a temp dir and renamed into place, and `latest` is
replaced last, so a crash at any point leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.state_file import read_state, write_state


def _is_tensor_dict(v) -> bool:
    return isinstance(v, dict) and len(v) > 0 and all(isinstance(x, torch.Tensor) for x in v.values())


def save(directory: str | Path, step: int, state: dict, keep_last: int = 0) -> Path:
    """state: {name: tensor dict -> safetensors | 'meta': json-able dict | other -> state/<name>.json}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step}"
    tmp = directory / f".tmp_step_{step}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = dict(state.get("meta", {}), step=step)
    for name, value in state.items():
        if name == "meta" or value is None:
            continue
        if _is_tensor_dict(value):
            save_file({k: v.detach().contiguous().cpu() for k, v in value.items()}, str(tmp / f"{name}.safetensors"))
        else:
            write_state(tmp / "state" / name, value)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = directory / f".latest_{os.getpid()}"
    pointer.write_text(final.name)
    os.replace(pointer, directory / "latest")
    if keep_last > 0:
        steps = sorted((p for p in directory.glob("step_*") if p.is_dir()), key=lambda p: int(p.name[5:]))
        for old in steps[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path) -> dict:
    path = Path(path)
    state: dict = {"meta": json.loads((path / "meta.json").read_text())}
    for f in sorted(path.iterdir()):
        if f.suffix == ".safetensors":
            state[f.stem] = load_file(str(f))
    for f in sorted((path / "state").glob("*.json")):
        state[f.stem] = read_state(f.with_suffix(""))
    return state


def latest_path(directory: str | Path) -> Path | None:
    """The step dir `latest` names; if it is missing, the highest complete step_N (has meta.json)."""
    directory = Path(directory)
    ptr = directory / "latest"
    if ptr.exists():
        cand = directory / ptr.read_text().strip()
        if (cand / "meta.json").exists():
            return cand
    done = [p for p in directory.glob("step_*") if (p / "meta.json").exists()]
    return max(done, key=lambda p: int(p.name[5:])) if done else None


def load_latest(directory: str | Path) -> tuple[int, dict] | None:
    path = latest_path(directory)
    if path is None:
        return None
    state = load(path)
    return int(state["meta"]["step"]), state
