"""Deterministic WebDataset tar and .npy bytes, written at the speed pretokenize needs.

The bytes equal what `tarfile` (USTAR, mtime 0, mode 0644, owner 0/"") and `np.save` write (tests compare them),
so webdataset and wids read the shards unchanged; only the cost differs. Measured on this 2-core machine,
`tarfile.addfile` spends ~135 us per member building the header in Python and `np.save` ~65 us per array, which at
four members per token sample cost more than the tokenizer forward per image. Here a header is one bytes template
with the name, size and checksum filled in, the member offsets come out of the writing itself (no second pass over
the tar), and an .npy header is built once per (dtype, length).
"""
from __future__ import annotations

import io
import os
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to whole records

# A USTAR header with every fixed field as tarfile writes it for _tarinfo below; name and size are filled in.
_FIXED = bytearray(BLOCK)
_FIXED[100:108] = b"0000644\0"  # mode
_FIXED[108:116] = b"0000000\0"  # uid
_FIXED[116:124] = b"0000000\0"  # gid
_FIXED[136:148] = b"00000000000\0"  # mtime 0
_FIXED[148:156] = b"        "  # checksum field counts as spaces
_FIXED[156] = ord("0")  # regular file
_FIXED[257:265] = b"ustar\x0000"
_FIXED_SUM = sum(_FIXED)


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """The member metadata every project tar uses (fixed mtime/owner: reruns give byte-identical files)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def _header(name: str, size: int) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8 ** 11:  # USTAR prefix split / huge member: tarfile's own header code
        return tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    h = bytearray(_FIXED)
    h[:len(raw)] = raw
    h[124:136] = b"%011o\0" % size
    chk = _FIXED_SUM + sum(raw) + sum(h[124:136])
    h[148:155] = b"%06o\0" % chk
    return bytes(h)


def write_tar(path: str | Path, samples, sort_members: bool = True) -> dict[str, dict[str, tuple[int, int]]]:
    """Write [(key, {ext: bytes})] via a temp file + atomic rename (a killed writer never leaves a shard that looks
    finished). Returns {key: {ext: (data offset, size)}} for the shard index."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    offsets: dict[str, dict[str, tuple[int, int]]] = {}
    chunks, pos = [], 0
    for key, members in samples:
        if "." in key:
            raise ValueError(f"sample key {key!r} contains '.', which WebDataset reads as an extension")
        where = offsets.setdefault(key, {})
        for ext in (sorted(members) if sort_members else members):
            data = members[ext]
            chunks.append(_header(f"{key}.{ext}", len(data)))
            where[ext] = (pos + BLOCK, len(data))
            chunks.append(data)
            pad = -len(data) % BLOCK
            if pad:
                chunks.append(bytes(pad))
            pos += BLOCK + len(data) + pad
    pos += 2 * BLOCK  # end-of-archive marker
    chunks.append(bytes(2 * BLOCK + (-pos % RECORD)))
    with open(tmp, "wb") as f:
        f.write(b"".join(chunks))
    os.replace(tmp, path)
    return offsets


@lru_cache(maxsize=256)
def _npy_header(descr: str, shape: tuple) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    return b.getvalue()


def npy_bytes(a: np.ndarray) -> bytes:
    """`np.save(a, allow_pickle=False)` of a C-contiguous array with a plain dtype, byte for byte."""
    a = np.ascontiguousarray(a)
    return _npy_header(np.lib.format.dtype_to_descr(a.dtype), a.shape) + a.tobytes()
