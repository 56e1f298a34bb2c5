"""Bidirectional GQA attention over an arbitrary mask, with QK RMSNorm and partial RoPE (LLaDA2.0 layout).

The mask is supplied by the caller (block-diffusion / document masks live in `training.diffusion.masks`) as either
  - a FlexAttention `BlockMask` (sparse: only the non-empty 128x128 tiles are computed), or
  - a boolean tensor broadcastable to [B, 1, Lq, Lk], True where a query may attend a key (dense SDPA fallback).
Both paths give the same output; `attend()` is the single place that chooses between them.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from training.model.norm import RMSNorm
from training.model.rope import apply_rope

try:  # FlexAttention ships with torch >= 2.5; on CPU it runs through torch.compile's CPU backend.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask, flex_attention = None, None


@functools.cache
def _compiled_flex():
    # flex_attention is only fast (and only sparse) when compiled; eager mode materialises the full score matrix.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B,H,Lq,D], k/v [B,Hkv,Lk,D] (GQA: H a multiple of Hkv) -> [B,H,Lq,D]."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is not None and mask.dtype == torch.bool:
        # A query row with no visible key (e.g. padding) would give NaN under SDPA; let it see itself instead.
        # Such rows never carry loss; this keeps gradients finite. Applied unconditionally: testing for empty rows
        # first would cost a host sync per layer on CUDA.
        empty = ~mask.any(-1, keepdim=True)
        lq, lk = mask.shape[-2], mask.shape[-1]
        eye = torch.zeros(lq, lk, dtype=torch.bool, device=mask.device)
        eye[:, lk - lq:] = torch.eye(lq, dtype=torch.bool, device=mask.device)
        mask = mask | (empty & eye)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Fused `query_key_value` projection split as [q heads | k heads | v heads], per-head RMSNorm on q and k,
    RoPE on the first `rotary_dim` dims of each head, output projection `dense` (official weight names)."""

    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=cfg.use_qkv_bias)
        self.query_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.key_layernorm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x, cos, sin, mask, past_kv=None):
        b, l, _ = x.shape
        # Local head counts come from the weight so a tensor-parallel shard of this module runs unchanged.
        heads_total = self.query_key_value.weight.shape[0] // self.head_dim
        kvh = heads_total * self.num_kv_heads // (self.num_heads + 2 * self.num_kv_heads)
        qkv = self.query_key_value(x).view(b, l, heads_total, self.head_dim)
        q, k, v = qkv.split([heads_total - 2 * kvh, kvh, kvh], dim=2)
        q = apply_rope(self.query_layernorm(q).transpose(1, 2), cos, sin)
        k = apply_rope(self.key_layernorm(k).transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        new_kv = (k, v)
        if past_kv is not None:  # cached keys/values of finished blocks (already normed and rotated)
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        out = attend(q, k, v, mask).transpose(1, 2).reshape(b, l, -1)
        return self.dense(out), new_kv
