"""CFG condition dropout for training, so one model also learns the unconditional branches used by the samplers.

Inference builds the unconditional prompt by *removing* the condition (the caption becomes one `<uncondition>` token,
the editing source image block disappears) and shifting later positions down. Training mirrors that without changing
the packed length: in a dropped span the first token becomes `<uncondition>` (text) or is removed too (image); removed
positions get a private document id (nobody attends them, they attend only themselves), carry no loss, and the
positions after them in the same document shift down by the number removed. Decisions are per document, so every
caption of a packed sequence is dropped independently. All vectorised, no loop over positions.
"""
from __future__ import annotations

import torch


def _segments(doc_ids: torch.Tensor):
    """Per position: index of its document segment within the row, and the index where that segment starts."""
    length = doc_ids.shape[1]
    idx = torch.arange(length, device=doc_ids.device).expand_as(doc_ids)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    seg = new.long().cumsum(1) - 1
    start = torch.where(new, idx, torch.zeros_like(idx)).cummax(1).values
    return seg, start


def drop_condition(batch: dict, span: torch.Tensor, prob: float, replace_id: int | None,
                   generator: torch.Generator | None = None) -> tuple[dict, torch.Tensor]:
    """Drop the condition `span` [B, L] of each document with probability `prob`.

    replace_id: keep the span's first token as this id (the `<uncondition>` token) or None to remove the whole span.
    Returns a new batch dict (input_ids, doc_ids, maskable, position_ids rewritten) and the bool [B, L] of the
    span positions that were dropped."""
    ids, doc, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
    seg, start = _segments(doc)
    u = torch.rand(doc.shape, device=doc.device, generator=generator)
    dropped_doc = u.gather(1, seg) < prob  # one draw per segment (indexed by segment number)
    span = span.bool() & dropped_doc
    prev = torch.zeros_like(span)
    prev[:, 1:] = span[:, :-1] & (seg[:, 1:] == seg[:, :-1])
    first = span & ~prev
    removed = span & ~first if replace_id is not None else span
    before = removed.long().cumsum(1) - removed.long()  # removed positions strictly before, whole row
    shift = before - before.gather(1, start)  # ... counted from the segment start
    out = dict(batch)
    out["position_ids"] = pos - shift
    if replace_id is not None:
        out["input_ids"] = torch.where(first, torch.full_like(ids, replace_id), ids)
    # Private ids below -1 collide neither with documents (>= 0) nor with the loader's padding id (-1).
    private = -2 - torch.arange(doc.shape[1], device=doc.device).expand_as(doc)
    out["doc_ids"] = torch.where(removed, private, doc)
    out["maskable"] = batch["maskable"] & ~span
    return out, span
