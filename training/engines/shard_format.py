"""The sharded checkpoint format: reshardable across layouts and engines, streamable one tensor at a time.

    <ckpt>/meta.json                      written by rank 0: format, engine, layout, optimizer step, tensor names
    <ckpt>/shards/rank00003.safetensors   the pieces this rank owns (each distinct piece written by one rank only)
    <ckpt>/shards/rank00003.json          index: key -> {name, offsets, sizes, global_shape, dtype}
    <ckpt>/extra/rank00003.json (+.safetensors)  trainer state passed to save() on that rank (RNG, loader, step)

Tensors are stored in the model's own names at their *global* coordinates: a piece is an N-d box (offsets, sizes)
of the full tensor `name`. Optimizer moments are stored in model space under `optim.exp_avg/<name>` and
`optim.exp_avg_sq/<name>` with the same boxes as their parameter, so a checkpoint written at TP=2 x EP=2 by megatron
loads into a single process, into deepspeed EP=2 or into any other layout: a reader asks for the box it needs and
gets it assembled from whichever saved pieces overlap (safetensors slice reads, never a whole file in memory).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "unidiff-sharded-v1"


def shard_paths(ckpt_dir: Path, rank: int) -> tuple[Path, Path]:
    d = Path(ckpt_dir) / "shards"
    return d / f"rank{rank:05d}.safetensors", d / f"rank{rank:05d}.json"


def write_rank_shards(ckpt_dir: Path, rank: int, entries: list[tuple[str, tuple, tuple, tuple, torch.Tensor]]):
    """entries: (name, global_shape, offsets, sizes, tensor-of-shape-sizes). Writes this rank's two files."""
    st_path, idx_path = shard_paths(ckpt_dir, rank)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors, index, counts = {}, {}, {}
    for name, gshape, offsets, sizes, t in entries:
        i = counts.get(name, 0)
        counts[name] = i + 1
        key = f"{name}|{i}"
        tensors[key] = t.detach().to("cpu").contiguous()
        index[key] = {"name": name, "global_shape": list(gshape), "offsets": list(offsets), "sizes": list(sizes),
                      "dtype": str(t.dtype).removeprefix("torch.")}
    save_file(tensors, str(st_path))
    _write_json(idx_path, index)
    return [st_path, idx_path]


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_meta(ckpt_dir: Path, meta: dict) -> Path:
    path = Path(ckpt_dir) / "meta.json"
    _write_json(path, {"format": FORMAT, **meta})
    return path


class ShardReader:
    """Random access to boxes of any tensor of a sharded checkpoint."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.dir} is not a unidiff checkpoint (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.dir}: checkpoint format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.entries: dict[str, list[tuple[Path, str, dict]]] = {}
        for idx_path in sorted((self.dir / "shards").glob("rank*.json")):
            st_path = idx_path.with_suffix(".safetensors")
            for key, e in json.loads(idx_path.read_text()).items():
                self.entries.setdefault(e["name"], []).append((st_path, key, e))
        self._files = {}

    def names(self) -> list[str]:
        return sorted(self.entries)

    def has(self, name: str) -> bool:
        return name in self.entries

    def global_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][0][2]["global_shape"])

    def _file(self, path: Path):
        if path not in self._files:
            self._files[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._files[path]

    def read_box(self, name: str, offsets, sizes, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of tensor `name`, assembled from the saved pieces that overlap it."""
        if name not in self.entries:
            raise KeyError(f"checkpoint {self.dir} has no tensor {name!r}")
        first = self.entries[name][0][2]
        out = torch.empty(tuple(sizes), dtype=dtype or getattr(torch, first["dtype"]))
        covered = 0
        for path, key, e in self.entries[name]:
            src, dst = [], []
            for o, s, eo, es in zip(offsets, sizes, e["offsets"], e["sizes"]):
                lo, hi = max(o, eo), min(o + s, eo + es)
                if lo >= hi:
                    break
                src.append(slice(lo - eo, hi - eo))
                dst.append(slice(lo - o, hi - o))
            else:
                piece = self._file(path).get_slice(key)[tuple(src)] if src else self._file(path).get_tensor(key)
                out[tuple(dst)] = piece.to(out.dtype)
                covered += piece.numel()
        if covered != out.numel():  # pieces never overlap (one owner each), so the counts must match exactly
            raise ValueError(f"checkpoint {self.dir}: tensor {name!r} box offsets={list(offsets)} sizes={list(sizes)}"
                             f" is covered {covered}/{out.numel()} elements: shards are missing or duplicated")
        return out

    def read_full(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = self.global_shape(name)
        return self.read_box(name, (0,) * len(shape), shape, dtype)

    def read_local(self, name: str, spec, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This rank's shard for a `ShardSpec` (any layout)."""
        if tuple(spec.global_shape) != self.global_shape(name):
            raise ValueError(f"checkpoint {self.dir}: {name!r} has shape {self.global_shape(name)}, the model "
                             f"expects {tuple(spec.global_shape)} (different model config?)")
        out = None
        for local, offsets, sizes in spec.boxes():
            box = self.read_box(name, offsets, sizes, dtype)
            if out is None:
                out = torch.empty(spec.local_shape, dtype=box.dtype)
            out[local] = box
        return out

    def iter_full(self, prefix_exclude: str = "optim."):
        """(name, full tensor) one at a time: for `unidiff convert hf-export` straight from any checkpoint."""
        for name in self.names():
            if not name.startswith(prefix_exclude):
                yield name, self.read_full(name)


def full_state_dict_from_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The unsharded weights in the model's own names, read from a checkpoint of any layout/engine (no engine,
    no process group needed)."""
    return dict(ShardReader(ckpt_dir).iter_full())
