"""Bidirectional GQA attention over an arbitrary mask, with QK RMSNorm and partial RoPE (LLaDA2.0 layout).

The mask is supplied by the caller (block-diffusion / document masks live in `training.diffusion.masks`) as either
  - a FlexAttention `BlockMask` (sparse: only the non-empty 128x128 tiles are computed), or
  - a boolean tensor broadcastable to [B, 1, Lq, Lk], True where a query may attend a key (dense SDPA fallback), or
  - a `TiledMask` made from such a tensor by `tile_mask`: SDPA over each query tile's visible key tiles only.
All paths give the same output; `attend()` is the single place that chooses between them.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

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


class TiledMask(NamedTuple):
    """A boolean [B, 1, L, L] mask kept on its non-empty tiles: query tile i of row b attends key tiles
    keys[b, i, :] under mask[b, i] ([1, T, m*T]); a tile seeing fewer than m is padded with tiles it does not see."""
    keys: torch.Tensor  # [B, L/T, m] long
    mask: torch.Tensor  # [B, L/T, 1, T, m*T] bool
    tile: int


def _self_for_empty(mask: torch.Tensor) -> torch.Tensor:
    """A query row with no visible key (e.g. padding) would give NaN under SDPA; let it see itself instead. Such
    rows never carry loss; this keeps gradients finite. Applied unconditionally: testing for empty rows first would
    cost a host sync per layer on CUDA."""
    empty = ~mask.any(-1, keepdim=True)
    lq, lk = mask.shape[-2], mask.shape[-1]
    eye = torch.zeros(lq, lk, dtype=torch.bool, device=mask.device)
    eye[:, lk - lq:] = torch.eye(lq, dtype=torch.bool, device=mask.device)
    return mask | (empty & eye)


def tile_mask(mask: torch.Tensor, tile: int = 32, max_fill: float = 0.75):
    """bool [B, 1, L, L] -> a TiledMask, or `mask` itself where tiling would not save (L not a multiple of `tile`,
    or some query tile sees more than `max_fill` of the key tiles). Packed documents under the block-diffusion mask
    leave most tiles empty (measured on the quickstart: SDPA was 61% of a CPU training step, computing them)."""
    b, _, lq, lk = mask.shape
    if lq != lk or lq % tile:
        return mask
    n = lq // tile
    tiles = _self_for_empty(mask).view(b, n, tile, n, tile)
    seen = tiles.any(4).any(2)  # [B, n, n]: query tile i sees some key of key tile j
    counts = seen.sum(-1)
    m = int(counts.max())  # one host sync per forward, not per layer
    if m > max_fill * n:
        return mask
    keys = torch.argsort((~seen).to(torch.uint8), dim=-1, stable=True)[..., :m]  # the visible tiles first
    picked = torch.gather(tiles, 3, keys[:, :, None, :, None].expand(b, n, tile, m, tile))
    return TiledMask(keys, picked.reshape(b, n, 1, tile, m * tile), tile)


def _attend_tiled(q, k, v, tm: TiledMask) -> torch.Tensor:
    """SDPA per query tile over its gathered key tiles: q [B,H,L,D], k/v [B,Hkv,L,D] -> [B,H,L,D]. The key/value
    heads are gathered before GQA expands them (SDPA's enable_gqa), so the copies stay Hkv wide."""
    b, h, length, d = q.shape
    n, t, m = length // tm.tile, tm.tile, tm.keys.shape[-1]
    rows = torch.arange(b, device=q.device)[:, None, None]

    def gather(x):  # [B,Hkv,L,D] -> [B*n, Hkv, m*T, D]
        x = x.view(b, x.shape[1], n, t, d).permute(0, 2, 1, 3, 4)[rows, tm.keys]  # [B, n, m, Hkv, T, D]
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b * n, -1, m * t, d)

    qt = q.view(b, h, n, t, d).transpose(1, 2).reshape(b * n, h, t, d)
    out = F.scaled_dot_product_attention(qt, gather(k), gather(v), attn_mask=tm.mask.view(b * n, 1, t, m * t),
                                         enable_gqa=h != k.shape[1])
    return out.view(b, n, h, t, d).transpose(1, 2).reshape(b, h, length, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B,H,Lq,D], k/v [B,Hkv,Lk,D] (GQA: H a multiple of Hkv) -> [B,H,Lq,D]."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _compiled_flex()(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    if isinstance(mask, TiledMask):
        return _attend_tiled(q, k, v, mask)
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is not None and mask.dtype == torch.bool:
        mask = _self_for_empty(mask)
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
