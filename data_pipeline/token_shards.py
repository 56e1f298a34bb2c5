"""TokenShards: the token samples of one token dir + split as memory-mapped numpy columns; random access by seek.

The per-shard JSON indices (`<shard>.index.json`, written by pretokenize) are parsed once into a column set
    token_dir/.index/<split>-<key>/  len.npy (int32)  n_img.npy (int32)  task.npy (uint8, TASKS order)
                                     shard.npy (int32)  offsets.npy (int64 [N, 6]: ids, mask, mod offset+size)
                                     meta.json (key, N, shard file names, task names)
with key = sha256(manifest.json, split, INDEX_FORMAT). The manifest holds every shard's index sha256, so a changed
shard, a rerun on changed raw data or another dataset in the same dir changes the key and the columns are rebuilt;
older sets of that split are removed. pretokenize and `--merge` write it next to manifest.json; a token dir
without it (older, or copied) gets it at first use, built by one process under a file lock while concurrent ranks
wait, written to a temp dir and renamed into place. A read-only token dir keeps it under $TMPDIR/unidiff-index/.
Opening it costs a few file opens: 10M samples start in well under a second and cost RSS only for the pages
touched (lengths and tasks for planning, offsets of the samples read); docs/data.md has the measured figures.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from data_pipeline.manifest import index_path, load_manifest, read_index

INDEX_FORMAT = 1
TASKS = ("caption", "vqa", "t2i", "interleaved")
COLUMNS = ("len", "n_image_tokens", "task", "ids_off", "ids_size", "mask_off", "mask_size", "mod_off", "mod_size")
OPEN_FILES = 64  # shard handles kept open per process (10k shards would exceed the fd limit)


def _key(manifest_bytes: bytes, split: str) -> str:
    return hashlib.sha256(manifest_bytes + f"\0{split}\0{INDEX_FORMAT}".encode()).hexdigest()[:16]


def _fallback_root(token_dir: Path) -> Path:
    return Path(tempfile.gettempdir()) / "unidiff-index" / \
        hashlib.sha256(str(token_dir.resolve()).encode()).hexdigest()[:16]


def _writable_root(token_dir: Path) -> Path:
    root = token_dir / ".index"
    try:
        root.mkdir(exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    root = _fallback_root(token_dir)
    print(f"token index: {token_dir} is not writable; index columns under {root}")
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_columns(token_dir: Path, split: str, manifest: dict, out: Path, key: str) -> None:
    """Parse the split's shard indices into the column files of `out` (a fresh dir)."""
    rows = manifest["splits"][split]["shards"]
    n = sum(int(r["token_samples"]) for r in rows)
    out.mkdir(parents=True)
    cols = {c: np.lib.format.open_memmap(out / f"{c}.npy", "w+", dt, shape)
            for c, dt, shape in (("len", np.int32, (n,)), ("n_img", np.int32, (n,)), ("task", np.uint8, (n,)),
                                 ("shard", np.int32, (n,)), ("offsets", np.int64, (n, 6)))}
    codes = {t: i for i, t in enumerate(TASKS)}
    at = 0
    for s, row in enumerate(rows):
        tar = token_dir / split / row["output"]
        idx = read_index(tar)
        if idx is None:
            raise FileNotFoundError(f"{index_path(tar)} is missing or unreadable but {token_dir}/manifest.json lists "
                                    f"it: rerun `unidiff pretokenize` (or `--merge` after an array job)")
        k = len(idx["samples"])
        if k != int(row["token_samples"]):
            raise ValueError(f"{index_path(tar)} lists {k} samples, manifest.json says {row['token_samples']}: the "
                             f"shard changed after the manifest was written; rerun `unidiff pretokenize`")
        if k:
            sl = slice(at, at + k)
            try:
                c = {name: i for i, name in enumerate(idx["columns"])}
                t = list(zip(*idx["samples"]))  # one pass over the rows, then whole columns
                cols["len"][sl] = np.asarray(t[c["len"]], dtype=np.int64)
                cols["n_img"][sl] = np.asarray(t[c["n_image_tokens"]], dtype=np.int64)
                cols["task"][sl] = [codes.get(x, 255) for x in t[c["task"]]]
                cols["offsets"][sl] = np.stack([np.asarray(t[c[name]], dtype=np.int64) for name in COLUMNS[3:]], 1)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{index_path(tar)} is not a token shard index ({type(e).__name__}: {e}): rerun "
                                 f"`unidiff pretokenize` for it") from None
            cols["shard"][sl] = s
        at += k
    for a in cols.values():
        a.flush()
    meta = {"key": key, "format": INDEX_FORMAT, "split": split, "samples": n,
            "shards": [r["output"] for r in rows], "tasks": list(TASKS)}
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def _build(token_dir: Path, split: str, manifest: dict, root: Path, key: str) -> Path:
    final = root / f"{split}-{key}"
    if not (final / "meta.json").exists():
        tmp = root / f".{split}-{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_columns(token_dir, split, manifest, tmp, key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, final)
        except OSError:  # another process renamed its (identical) set first
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_index(token_dir: str | Path, split: str) -> Path:
    """The column set of (token_dir, split) for the current manifest: found, or built (older sets removed)."""
    token_dir = Path(token_dir)
    mbytes = (token_dir / "manifest.json").read_bytes()
    key = _key(mbytes, split)
    for r in (token_dir / ".index", _fallback_root(token_dir)):
        if (r / f"{split}-{key}" / "meta.json").exists():
            return r / f"{split}-{key}"
    root = _writable_root(token_dir)
    with open(root / f"{split}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks: one builds, the others then find it done
        final = _build(token_dir, split, json.loads(mbytes), root, key)
        for old in root.glob(f"{split}-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)  # memmaps a running job holds stay valid (POSIX unlink)
    return final


def write_indices(token_dir: str | Path, manifest: dict) -> None:
    """pretokenize / --merge: the column set of every split, next to manifest.json (no lock file left behind)."""
    token_dir = Path(token_dir)
    root = token_dir / ".index"
    root.mkdir(exist_ok=True)
    mbytes = (token_dir / "manifest.json").read_bytes()
    keep = set()
    for split in manifest["splits"]:
        keep.add(_build(token_dir, split, manifest, root, _key(mbytes, split)).name)
    for old in root.iterdir():
        if old.is_dir() and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)


class TokenShards:
    """The samples of token_dir/<split>, optionally only some tasks, in manifest shard order then index order.

    Columns: lengths, n_img, splittable (text-only pretraining documents, which packing may cut), shard, offsets.
    Pickles without its arrays and file handles (loader worker processes reopen them lazily)."""

    def __init__(self, token_dir: str | Path, split: str, tasks: tuple[str, ...] | None = None):
        self.token_dir, self.split, self.tasks = Path(token_dir), split, tasks
        self.manifest = load_manifest(token_dir)
        if split not in self.manifest["splits"]:
            raise ValueError(f"{token_dir}/manifest.json has no split {split!r} (has "
                             f"{sorted(self.manifest['splits'])})")
        self.vocab = self.manifest["vocab"]
        base = os.path.join(self.token_dir, split)  # str, not Path: 10k Path joins cost ~0.2 s
        self.shards = [os.path.join(base, r["output"]) for r in self.manifest["splits"][split]["shards"]]
        self.dir = write_index(self.token_dir, split)
        self._open()
        if not len(self):
            raise ValueError(f"{token_dir} split {split!r} has no samples of tasks {tasks}")

    def _open(self) -> None:
        load = lambda c: np.load(self.dir / f"{c}.npy", mmap_mode="r")  # noqa: E731
        task = load("task")
        self._sel = None if self.tasks is None else \
            np.flatnonzero(np.isin(task, [TASKS.index(t) for t in self.tasks if t in TASKS]))
        pick = (lambda a: a) if self._sel is None else (lambda a: a[self._sel])  # noqa: E731
        self.lengths, self.n_img, self.shard = pick(load("len")), pick(load("n_img")), pick(load("shard"))
        self.splittable = (pick(task) == TASKS.index("interleaved")) & (self.n_img == 0)
        self._offsets = load("offsets")
        self._files: OrderedDict[int, int] = OrderedDict()

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets if self._sel is None else self._offsets[self._sel]

    def __len__(self) -> int:
        return len(self.lengths)

    def _fd(self, sh: int) -> int:
        fd = self._files.pop(sh, None)
        if fd is None:
            if len(self._files) >= OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
            fd = os.open(self.shards[sh], os.O_RDONLY)
        self._files[sh] = fd
        return fd

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32, maskable bool, modality uint8) of sample i: one pread over its three members."""
        j = int(i) if self._sel is None else int(self._sel[i])
        o = self._offsets[j]
        lo, hi = int(min(o[0], o[2], o[4])), int(max(o[0] + o[1], o[2] + o[3], o[4] + o[5]))
        sh = int(self.shard[i])
        buf = os.pread(self._fd(sh), hi - lo, lo)
        if len(buf) != hi - lo:
            raise ValueError(f"{self.shards[sh]} is shorter than its index says (sample {j}): rerun "
                             f"`unidiff pretokenize`")
        return tuple(np.load(io.BytesIO(buf[int(o[2 * k]) - lo:int(o[2 * k] + o[2 * k + 1]) - lo]),
                             allow_pickle=False) for k in range(3))

    def close(self) -> None:
        files = getattr(self, "_files", None)
        while files:
            try:
                os.close(files.popitem()[1])
            except OSError:
                pass

    __del__ = close

    def __getstate__(self):
        d = {k: v for k, v in self.__dict__.items()
             if k not in ("lengths", "n_img", "shard", "splittable", "_offsets", "_sel", "_files")}
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._open()
