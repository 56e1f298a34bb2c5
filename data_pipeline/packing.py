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

from dataclasses import dataclass

import numpy as np

PAD_DOC = -1  # doc id of padding positions


@dataclass
class PackPlan:
    rows: list[list[tuple[int, int, int]]]  # per row: (document index, start, end) pieces in order
    dropped: list[int]  # documents longer than the row that cannot be cut
    padding: int  # pad positions over all rows


def padded_length(n: np.ndarray, block_size: int | None, seq_len: int) -> np.ndarray:
    if not block_size:
        return n
    p = -(-n // block_size) * block_size
    return np.where(n <= seq_len, np.minimum(p, seq_len), n)


def plan_rows(lengths: np.ndarray, splittable: np.ndarray, seq_len: int, block_size: int | None = None) -> PackPlan:
    lens = padded_length(np.asarray(lengths, dtype=np.int64), block_size, seq_len)
    raw = np.asarray(lengths, dtype=np.int64)
    rows, cur, fill, dropped, pad = [], [], 0, [], 0
    for d in range(len(lens)):  # one step per document, not per token
        L = int(lens[d])
        if L > seq_len:
            if not splittable[d]:
                dropped.append(d)
                continue
            pieces = [(s, min(s + seq_len, int(raw[d]))) for s in range(0, int(raw[d]), seq_len)]
        else:
            pieces = [(0, int(raw[d]))]
        for s, e in pieces:
            span = L if len(pieces) == 1 else int(padded_length(np.array([e - s]), block_size, seq_len)[0])
            if fill + span > seq_len:
                rows.append(cur)
                pad += seq_len - fill
                cur, fill = [], 0
            cur.append((d, s, e))
            fill += span
    if cur:
        rows.append(cur)
        pad += seq_len - fill
    return PackPlan(rows, dropped, pad)


def materialise_row(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
                    block_size: int | None = None, offset: int | None = None) -> dict[str, np.ndarray]:
    """pieces: (ids, maskable, modality) slices in row order -> row arrays of length seq_len.
    Block padding (maskable EOS, the document's own id) follows each piece when block_size is given."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    doc = np.full(seq_len, PAD_DOC, dtype=np.int64)
    msk = np.zeros(seq_len, dtype=bool)
    img = np.zeros(seq_len, dtype=bool)
    pos = np.zeros(seq_len, dtype=np.int64)
    at = 0
    for j, (i, m, mod) in enumerate(pieces):
        n = len(i)
        span = n if not block_size else min(-(-n // block_size) * block_size, seq_len - at)
        ids[at:at + n] = i
        msk[at:at + n] = m
        img[at:at + n] = mod.astype(bool)
        msk[at + n:at + span] = True  # EOS padding of the answer is part of what the model learns
        doc[at:at + span] = j
        pos[at:at + span] = np.arange(span)
        at += span
    return {"input_ids": ids, "doc_ids": doc, "maskable": msk, "is_image": img, "position_ids": pos}
