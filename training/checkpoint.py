"""Checkpoint directories of a run: atomic writes, a `latest` pointer, keep-last-N, fallback on corruption.

    <run>/checkpoints/step_000120/          one checkpoint (engine shards + extra, see engines/shard_format.py)
    <run>/checkpoints/step_000120/manifest.json   written LAST inside the dir: every file with its size and sha256
    <run>/checkpoints/latest                text file naming the newest complete checkpoint, written after rename

Save protocol (collective): rank 0 clears and creates `.tmp_step_N`; every rank writes its shards there; each rank
hashes a disjoint subset of the files, rank 0 gathers them, writes the manifest, fsyncs, renames the dir to
`step_N`, then replaces `latest` (write-temp + os.replace), then prunes. A process killed at any point leaves either
a `.tmp_*` dir (ignored, removed by the next save) or a complete `step_N`; `latest` only ever names complete ones.
`latest_valid()` verifies the manifest (sizes everywhere, each rank the hashes of 1/world of the files, one answer
for all ranks) and falls back to the newest valid checkpoint with a warning when `latest` is missing, stale,
partial or corrupt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d+)$")
MANIFEST = "manifest.json"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def verify(ckpt: Path, hashes: bool = True, rank: int = 0, world: int = 1) -> str | None:
    """None if `ckpt` is complete and intact, else the reason it is not. Every caller checks that every file exists
    with its size (a stat); the sha256 of file i is checked by rank i % world only, so at scale each rank reads
    1/world of the checkpoint instead of all of it (195 GB for the 16B with Adam moments)."""
    ckpt = Path(ckpt)
    man = ckpt / MANIFEST
    if not man.is_file():
        return f"{man} is missing (save did not finish)"
    try:
        files = json.loads(man.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{man} is unreadable: {e}"
    for i, (rel, info) in enumerate(sorted(files.items())):
        p = ckpt / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != info["size"]:
            return f"{p} has {p.stat().st_size} bytes, manifest says {info['size']}"
        if hashes and i % world == rank and _sha256(p) != info["sha256"]:
            return f"{p} does not match its sha256 in the manifest"
    return None


def _verify_everywhere(ckpt: Path, hashes: bool) -> str | None:
    """Collective when distributed: every rank verifies its part, and all ranks get the same answer (the first
    problem found, naming the rank that saw it), so ranks with different filesystem views cannot resume from
    different checkpoints."""
    rank, world = rank_world()
    problem = verify(ckpt, hashes, rank, world)
    if world == 1:
        return problem
    seen = [None] * world
    dist.all_gather_object(seen, problem)
    return next((f"rank {r}: {p}" for r, p in enumerate(seen) if p is not None), None)


def _rank0_list(items: list) -> list:
    """Rank 0's list on every rank (so all ranks verify the same candidates in the same order)."""
    if rank_world()[1] == 1:
        return items
    box = [items]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointManager:
    """Every stage's checkpoints (backbone, decoder, distill). `save(writer, step, extra)` is collective; `writer`
    is anything with `.save(tmp_dir, extra)` that writes this rank's files (an engine, or a stage's state writer).
    root: `<run_dir>/checkpoints`, or given directly (a stage's own `<run>/<stage>/checkpoints`)."""

    def __init__(self, run_dir: Path | None = None, keep_last: int = 3, verify_hashes: bool = True,
                 root: Path | None = None):
        self.root = Path(root) if root is not None else Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.verify_hashes = verify_hashes

    @staticmethod
    def step_dir_name(step: int) -> str:
        return f"step_{step:06d}"

    def _checkpoints(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
        return sorted(out)

    def save(self, engine, step: int, extra: dict) -> Path:
        """Collective over all ranks (`engine`: the writer). Returns the final checkpoint path."""
        t0 = time.time()
        rank, world = rank_world()
        final = self.root / self.step_dir_name(step)
        tmp = self.root / f".tmp_{self.step_dir_name(step)}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_*"):  # leftovers of a killed save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        engine.save(tmp, extra)
        _barrier()
        # Hash in parallel: rank r takes every world-th file.
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        mine = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in files[rank::world]}
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        if rank == 0:
            manifest = {"step": step, "created": time.time(), "files": {k: v for g in gathered for k, v in g.items()}}
            with open(tmp / MANIFEST, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # re-save of the same step: move the old one aside first
                old = self.root / f".tmp_old_{final.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._write_latest(final.name)
            self._prune()
            total = sum(v["size"] for v in manifest["files"].values())
            log.info("checkpoint step %d -> %s (%d files, %.1f MB) in %.1fs", step, final, len(manifest["files"]),
                     total / 1e6, time.time() - t0)
        _barrier()
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.root / ".latest.tmp"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "latest")
        _fsync_dir(self.root)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        latest = (self.root / "latest").read_text().strip() if (self.root / "latest").exists() else None
        ckpts = self._checkpoints()
        for _, p in ckpts[:-self.keep_last]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    def latest_valid(self, collective: bool = True) -> Path | None:
        """The checkpoint named by `latest` if it verifies, else the newest one that does (with a warning).
        Collective when distributed: every rank calls it, verifies rank 0's candidates (by name, under its own
        root) in order, and all agree on the answer (`_verify_everywhere`). collective=False: this process alone
        (a reader that only some ranks run, e.g. loading a decoder to evaluate)."""
        pointer = self.root / "latest"
        named = pointer.read_text().strip() if pointer.is_file() else None
        candidates = [named] + [p.name for _, p in reversed(self._checkpoints())]
        named, *older = _rank0_list(candidates) if collective else candidates
        check = _verify_everywhere if collective else verify
        if named is not None:
            problem = check(self.root / named, self.verify_hashes)
            if problem is None:
                return self.root / named
            log.warning("latest checkpoint is not usable: %s; falling back to the newest valid one", problem)
        for name in older:
            if name == named:
                continue
            problem = check(self.root / name, self.verify_hashes)
            if problem is None:
                if named is not None:
                    log.warning("resuming from %s instead", self.root / name)
                return self.root / name
            log.warning("skipping checkpoint %s: %s", self.root / name, problem)
        return None
