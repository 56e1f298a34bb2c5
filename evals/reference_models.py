"""Reference models with known scores, for checking the harness itself (tests, `--tasks` sanity runs).

Both honour the backbone's forward contract (input_ids, position_ids, attention_mask, past_kv, use_cache ->
ModelOutput with logits [B, L, V] and per-layer kv), so every sampler and estimator runs on them unchanged.

- `OracleModel(targets, vocab_size, mask_id)`: knows a set of target sequences. For each row it identifies the
  target that agrees with the most visible (non-mask) tokens of the row, at their position ids, including tokens
  seen in earlier calls (it stores ids and positions in its KV cache), and puts all probability mass on the
  target's token at every position (EOS past the target's end). So it generates every answer exactly (100% on
  vqa / t2i / caption), scores a NELBO of 0 on its targets and prefers the right choice.
- `UniformModel(vocab_size)`: zero logits everywhere; its NELBO is exactly log V per token and it ties every
  multiple-choice candidate of equal length (chance level).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from training.model import ModelOutput


class UniformModel(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(attention="sdpa", vocab_size=vocab_size)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_kv=None, use_cache=False,
                inputs_embeds=None):
        b, n = input_ids.shape
        kv = [(torch.zeros(b, 1, n, 1), torch.zeros(b, 1, n, 1))] if use_cache else None
        return ModelOutput(logits=torch.zeros(b, n, self.vocab_size), aux_loss=torch.zeros(()), kv=kv)


class OracleModel(nn.Module):
    def __init__(self, targets: list[list[int]], vocab_size: int, mask_id: int, eos_id: int | None = None,
                 confidence: float = 30.0):
        super().__init__()
        self.vocab_size, self.mask_id, self.confidence = vocab_size, mask_id, confidence
        self.eos_id = mask_id if eos_id is None else eos_id
        width = max(len(t) for t in targets)
        table = torch.full((len(targets), width), -1, dtype=torch.long)
        for i, t in enumerate(targets):  # once per target
            table[i, :len(t)] = torch.as_tensor(t, dtype=torch.long)
        self.register_buffer("table", table)
        self.config = SimpleNamespace(attention="sdpa", vocab_size=vocab_size)

    def _lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """table value at each position: [T, ...] (EOS beyond a target's end)."""
        pos = positions.clamp(0, self.table.shape[1] - 1)
        val = self.table[:, pos.reshape(-1)].view(self.table.shape[0], *positions.shape)
        beyond = (positions >= self.table.shape[1])[None] | (val < 0)
        return torch.where(beyond, torch.full_like(val, self.eos_id), val)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_kv=None, use_cache=False,
                inputs_embeds=None):
        b, n = input_ids.shape
        if position_ids is None:
            start = past_kv[0][0].shape[2] if past_kv else 0
            position_ids = torch.arange(start, start + n).expand(b, n)
        ids, pos = input_ids, position_ids.long()
        if past_kv:  # earlier tokens of this row, kept in the cache as floats
            ids = torch.cat([past_kv[0][0][:, 0, :, 0].long(), ids], 1)
            pos = torch.cat([past_kv[0][1][:, 0, :, 0].long(), pos], 1)
        expect = self._lookup(pos)  # [T, B, Lctx]
        visible = ids != self.mask_id
        agree = ((expect == ids[None]) & visible[None]).sum(-1)  # [T, B]
        best = agree.argmax(0)  # [B]: the target this row is
        tgt = self._lookup(position_ids.long())  # [T, B, n]
        want = tgt.gather(0, best[None, :, None].expand(1, b, n))[0]
        logits = torch.zeros(b, n, self.vocab_size)
        logits.scatter_(-1, want[..., None], self.confidence)
        kv = None
        if use_cache:
            kv = [(input_ids.float()[:, None, :, None], position_ids.float()[:, None, :, None])]
        return ModelOutput(logits=logits, aux_loss=torch.zeros(()), kv=kv)
