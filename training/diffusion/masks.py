"""Attention masks of the diffusion objective and the samplers.

Training (block diffusion, BD3-LM / LLaDA2.0 Eq. 1) feeds x_t followed by x_0 (2L tokens, same position ids). With
b(i) = (i mod L) // block_size, a query may attend a key when both lie in the same document and
  x_t -> x_t: same block          (the noisy block sees itself)
  x_t -> x_0: strictly earlier    (clean context of finished blocks)
  x_0 -> x_0: same or earlier     (block-causal clean stream, reused as the KV cache at inference)
  x_0 -> x_t: never.
MDLM (block = whole sequence) only needs the x_t half under the same-document mask.

One rule (`_bd_rule`) serves both attention paths: it is the FlexAttention `mask_mod` (scalar index tensors) and,
called once on broadcast index grids, the dense boolean mask for SDPA. So the two paths cannot drift apart.
"""
from __future__ import annotations

import os

import torch

from training.diffusion.schedule import whole_sequence
from training.model.attention import tile_mask

try:
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # pragma: no cover - torch without FlexAttention
    create_block_mask = None


def _bd_rule(q, kv, doc_q, doc_kv, block_size: int, seq_len: int):
    q_clean, kv_clean = q >= seq_len, kv >= seq_len
    qb, kb = (q % seq_len) // block_size, (kv % seq_len) // block_size
    noisy_noisy = ~q_clean & ~kv_clean & (qb == kb)
    noisy_clean = ~q_clean & kv_clean & (kb < qb)
    clean_clean = q_clean & kv_clean & (kb <= qb)
    return (noisy_noisy | noisy_clean | clean_clean) & (doc_q == doc_kv)


def bd_mask_mod(doc_ids: torch.Tensor, block_size: int):
    """FlexAttention mask_mod over the x_t || x_0 layout for a batch of packed sequences, doc_ids [B, L]."""
    seq_len = doc_ids.shape[-1]

    def mask_mod(b, h, q, kv):
        return _bd_rule(q, kv, doc_ids[b, q % seq_len], doc_ids[b, kv % seq_len], block_size, seq_len)

    return mask_mod


def doc_mask_mod(doc_ids: torch.Tensor):
    """FlexAttention mask_mod of MDLM on packed sequences: bidirectional within a document."""

    def mask_mod(b, h, q, kv):
        return doc_ids[b, q] == doc_ids[b, kv]

    return mask_mod


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _dense(mask_mod, batch: int, length: int, device) -> torch.Tensor:
    """Evaluate a mask_mod on broadcast index grids -> bool [B, 1, length, length] (one vectorised call)."""
    need = batch * length * length  # bytes of the bool mask (its int64 index grids broadcast, never materialised)
    limit = _host_memory_bytes() // 4 if device.type == "cpu" else None
    if limit is not None and need > limit:
        raise MemoryError(f"a dense attention mask of {batch} x {length} x {length} positions needs "
                          f"{need / 2**30:.1f} GiB, more than a quarter of this machine's {_host_memory_bytes() / 2**30:.0f} "
                          f"GiB: use the FlexAttention path (model.attention=flex, on CUDA), a shorter train.seq_len "
                          f"or a smaller micro batch")
    b = torch.arange(batch, device=device)[:, None, None, None]
    q = torch.arange(length, device=device)[None, None, :, None]
    kv = torch.arange(length, device=device)[None, None, None, :]
    return mask_mod(b, torch.zeros((), dtype=torch.long, device=device), q, kv)


def block_diffusion_mask(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """doc_ids LongTensor [L] -> BoolTensor [2L, 2L] over x_t || x_0, True where query i may attend key j."""
    if doc_ids.dim() != 1:
        raise ValueError(f"block_diffusion_mask takes doc_ids of shape [L], got {tuple(doc_ids.shape)}; "
                         f"use dense_training_mask for a batch")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be >= 1")
    length = doc_ids.shape[0]
    return _dense(bd_mask_mod(doc_ids[None], block_size), 1, 2 * length, doc_ids.device)[0, 0]


def dense_training_mask(doc_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """doc_ids [B, L] -> bool [B, 1, 2L, 2L] (block diffusion) or [B, 1, L, L] (MDLM when block_size >= L)."""
    bsz, length = doc_ids.shape
    if whole_sequence(block_size, length):
        return _dense(doc_mask_mod(doc_ids), bsz, length, doc_ids.device)
    return _dense(bd_mask_mod(doc_ids, block_size), bsz, 2 * length, doc_ids.device)


def flex_training_mask(doc_ids: torch.Tensor, block_size: int):
    """Same mask as `dense_training_mask`, as a FlexAttention BlockMask (only non-empty 128x128 tiles computed)."""
    if create_block_mask is None:
        raise RuntimeError("this torch has no FlexAttention; set model.attention=sdpa")
    bsz, length = doc_ids.shape
    if whole_sequence(block_size, length):
        mod, n = doc_mask_mod(doc_ids), length
    else:
        mod, n = bd_mask_mod(doc_ids, block_size), 2 * length
    # Compiling the mask construction avoids materialising [B, n, n] on GPU; on CPU the eager path is quicker.
    return create_block_mask(mod, bsz, None, n, n, device=doc_ids.device, _compile=doc_ids.device.type == "cuda")


def use_flex(attention: str, device) -> bool:
    """model.attention: flex | sdpa | auto. auto = flex on CUDA, tiled SDPA on CPU: torch 2.13 has no FlexAttention
    backward on CPU, and its forward costs ~20 s of compile per shape (bench/bench_attention.py has the numbers)."""
    if attention == "flex":
        if create_block_mask is None:
            raise RuntimeError("model.attention=flex but this torch has no FlexAttention; use sdpa or auto")
        return True
    if attention == "sdpa":
        return False
    return create_block_mask is not None and torch.device(device).type == "cuda"


def training_mask(doc_ids: torch.Tensor, block_size: int, attention: str = "auto"):
    """The attention mask of one training forward, on the path model.attention selects."""
    if use_flex(attention, doc_ids.device):
        if doc_ids.device.type == "cpu" and torch.is_grad_enabled():
            raise RuntimeError("model.attention=flex cannot train on CPU: FlexAttention has no CPU backward in this "
                               "torch; use model.attention=auto (tiled SDPA on CPU, flex on CUDA) or sdpa")
        return flex_training_mask(doc_ids, block_size)
    mask = dense_training_mask(doc_ids, block_size)
    # auto off CUDA: SDPA over the non-empty tiles only; sdpa is the dense reference (what `unidiff plan` measures)
    return tile_mask(mask) if attention == "auto" else mask


def training_inputs(x_t: torch.Tensor, x0: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor,
                    block_size: int, attention: str = "auto"):
    """(input ids, position ids, attention mask) of the training forward, for the loss and the ELBO alike:
    x_t alone under the document mask (MDLM), or x_t || x_0 under the block-diffusion mask."""
    length = x_t.shape[1]
    if whole_sequence(block_size, length):
        return x_t, positions, training_mask(doc_ids, length, attention)
    return (torch.cat([x_t, x0], 1), torch.cat([positions, positions], 1),
            training_mask(doc_ids, block_size, attention))


def block_causal_mask(q_index: torch.Tensor, key_valid: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sampler mask: queries at sequence indices q_index [Lq] over keys 0..Lk-1 (cache then new tokens).
    A key is visible when it is valid (not left padding) and its block is not later than the query's block, the
    clean-stream rule of training. key_valid [R, Lk] -> bool [R, 1, Lq, Lk]."""
    k_index = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = (k_index[None, :] // block_size) <= (q_index[:, None] // block_size)
    return (causal[None] & key_valid[:, None, :])[:, None]
