"""Packing documents into fixed-length rows with per-position document ids.

Plan first, from lengths alone (cheap, identical on every rank), then materialise rows from the token arrays.
Rules:
- Greedy next-fit in the given (shuffled) order: a document that does not fit the rest of the current row closes
  it; the rest of that row is padding (pad = EOS id, doc id -1, not maskable, position 0). Nothing is cut to
  fill a gap, so an image block is never split and a prompt is never separated from its answer.
- With a block size b (and pad_to_block), each document is extended with maskable EOS to a multiple of b — so every
  document starts on a block boundary and answers end on one (LLaDA SFT pads answers with EOS the model learns).
- A document longer than the row: text-only pretraining documents are cut into row-sized pieces (each piece its
  own document); any other (it holds an image block or a prompt/answer pair) is dropped and counted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAD_DOC = -1  # doc id of padding positions


class PackRows(Sequence):
    """The rows of a plan as a sequence of [(document index, start, end), ...] lists, made on access: a loader
    builds Python objects only for the rows its rank reads (10M documents would be ~1.5 GB of tuples)."""

    def __init__(self, plan: "PackPlan", lo: int = 0, hi: int | None = None):
        self.plan, self.lo, self.hi = plan, lo, len(plan.row_start) - 1 if hi is None else hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, r):
        if isinstance(r, slice):
            lo, hi, step = r.indices(len(self))
            if step != 1:
                return [self[k] for k in range(lo, hi, step)]
            return PackRows(self.plan, self.lo + lo, self.lo + max(lo, hi))
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        p = self.plan
        a, b = int(p.row_start[self.lo + r]), int(p.row_start[self.lo + r + 1])
        return list(zip(p.doc[a:b].tolist(), p.start[a:b].tolist(), p.end[a:b].tolist()))


@dataclass
class PackPlan:
    """Pieces in row order (piece k = doc[k][start[k]:end[k]]); row r holds pieces row_start[r]:row_start[r+1]."""
    doc: np.ndarray
    start: np.ndarray
    end: np.ndarray
    row_start: np.ndarray
    dropped: list[int]  # documents longer than the row that cannot be cut
    padding: int  # pad positions over all rows

    @property
    def rows(self) -> PackRows:
        return PackRows(self)


def padded_length(n: np.ndarray, block_size: int | None, seq_len: int) -> np.ndarray:
    if not block_size:
        return n
    p = -(-n // block_size) * block_size
    return np.where(n <= seq_len, np.minimum(p, seq_len), n)


def plan_rows(lengths: np.ndarray, splittable: np.ndarray, seq_len: int, block_size: int | None = None) -> PackPlan:
    """Greedy next-fit, vectorised: documents expand into pieces (one, or row-sized cuts of a long text document),
    a searchsorted over the cumulative piece spans gives, for every piece, where a row starting at it ends, and one
    walk over those jumps (one step per row, not per document) picks the row starts. The same rows as the
    one-document-at-a-time loop (tests/test_data_token_shards.py compares them)."""
    raw = np.asarray(lengths, dtype=np.int64)
    lens = padded_length(raw, block_size, seq_len)
    too_long = lens > seq_len
    cut = too_long & np.asarray(splittable, dtype=bool)
    dropped = np.flatnonzero(too_long & ~cut)
    docs = np.flatnonzero(~too_long | cut) if too_long.any() else np.arange(len(raw))
    if len(docs) == len(raw):
        raw_docs, lens_docs = raw, lens
    else:
        raw_docs, lens_docs = raw[docs], lens[docs]
    if cut.any():  # row-sized pieces; the last one is the remainder
        n_pieces = np.where(cut[docs], -(-raw[docs] // seq_len), 1)
        doc = np.repeat(docs, n_pieces)
        start = (np.arange(len(doc)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)) * seq_len
        end = np.minimum(start + seq_len, raw[doc])
        span = padded_length(end - start, block_size, seq_len)
    else:
        doc, start, end, span = docs, np.zeros(len(docs), dtype=np.int64), raw_docs, lens_docs
    cum = np.cumsum(span)
    # a row opened by piece k holds pieces k .. stop[k]-1: those whose spans fit seq_len together
    stop = np.searchsorted(cum, cum - span + seq_len, side="right")
    starts, k, n, jump = [], 0, len(doc), stop.item
    while k < n:
        starts.append(k)
        k = jump(k)
    row_start = np.asarray(starts + [n], dtype=np.int64)
    pad = (len(row_start) - 1) * seq_len - int(cum[-1]) if n else 0
    return PackPlan(doc, start, end, row_start, dropped.tolist(), pad)


def materialise_row(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
                    block_size: int | None = None, offset: int | None = None,
                    reveal: bool = False) -> dict[str, np.ndarray]:
    """pieces: (ids, maskable, modality) slices in row order -> row arrays of length seq_len.
    Block padding (maskable EOS, the document's own id) follows each piece when block_size is given.
    reveal: the maskable column holds a sampler trajectory's order (backbone path distillation: 0 context, k + 1
    revealed at the k-th denoising step of its block); it is kept as `reveal` (int64, 0 on any padding)."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    doc = np.full(seq_len, PAD_DOC, dtype=np.int64)
    msk = np.zeros(seq_len, dtype=bool)
    img = np.zeros(seq_len, dtype=bool)
    pos = np.zeros(seq_len, dtype=np.int64)
    order = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for j, (i, m, mod) in enumerate(pieces):
        n = len(i)
        span = n if not block_size else min(-(-n // block_size) * block_size, seq_len - at)
        ids[at:at + n] = i
        msk[at:at + n] = m
        order[at:at + n] = m
        img[at:at + n] = mod.astype(bool)
        msk[at + n:at + span] = True  # EOS padding of the answer is part of what the model learns
        doc[at:at + span] = j
        pos[at:at + span] = np.arange(span)
        at += span
    row = {"input_ids": ids, "doc_ids": doc, "maskable": msk, "is_image": img, "position_ids": pos}
    return {**row, "reveal": order} if reveal else row
