"""Trainer state (RNG states, loader cursors, optimizer state dicts) as JSON + safetensors: nothing read back can
execute code, unlike a pickle.

    <stem>.json          the object tree; tensors appear as {"__tensor__": key}
    <stem>.safetensors   those tensors (only written when there are any)

JSON has no tuples, no non-string keys and no arrays, which Python/numpy RNG states and optimizer state dicts use,
so they are tagged ({"__tuple__": [...]}, {"__items__": [[k, v], ...]}, {"__ndarray__": [...], "dtype": ...}) and
come back as the same types: `read_state(write_state(x)) == x`, exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _encode(obj, tensors: dict):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"state value of type {type(obj).__name__} cannot be saved as JSON/safetensors: {obj!r:.80}")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _file(stem: Path, ext: str) -> Path:
    return stem.with_name(stem.name + ext)  # not with_suffix: a stem may contain dots


def write_state(stem: Path, obj) -> list[Path]:
    """Writes <stem>.json (+ <stem>.safetensors), fsynced; returns the paths written."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    tree = _encode(obj, tensors)
    paths = []
    if tensors:
        paths.append(_file(stem, ".safetensors"))
        save_file(tensors, str(paths[-1]))
    with open(_file(stem, ".json"), "w") as f:
        json.dump(tree, f)
        f.flush()
        os.fsync(f.fileno())
    return paths + [_file(stem, ".json")]


def read_state(stem: Path):
    stem = Path(stem)
    st = _file(stem, ".safetensors")
    tensors = load_file(str(st)) if st.exists() else {}
    return _decode(json.loads(_file(stem, ".json").read_text()), tensors)


def state_exists(stem: Path) -> bool:
    return _file(Path(stem), ".json").is_file()
