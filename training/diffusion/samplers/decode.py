"""Block-by-block diffusion decoding over a block-causal KV cache (LLaDA2.0 `generate`, BD3-LM sampling).

The sequence index space is [prompt (left-padded to P) | gen_length masks], cut into blocks of `block_length`
from index 0. Full prompt blocks are prefilled once. Each block is then denoised in at most `steps` forward passes;
each pass feeds only the current block over the cache. A finished block is not recomputed on its own: it rides along
(clean) in the first forward of the next block under the block-causal mask, and its keys/values are appended to the
cache from that forward. So the cache always holds the clean stream, exactly as x_0 is seen in training.

Guidance: the rows R may be several branches of the same S samples (branch-major: rows [b*S:(b+1)*S] are branch b,
e.g. conditional / unconditional prompts). `guide` maps the per-row logits [R, Lb, V] to [S, Lb, V]; accepted tokens
are written to every branch, so all branches decode the same canvas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from training.diffusion.masks import block_causal_mask
from training.diffusion.samplers.common import accept, propose, scheduled_count


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [S, gen_length] generated ids (positions after an early stop hold eos_id)
    lengths: torch.Tensor  # [S] tokens before the first EOS (gen_length if none)
    nfe: int  # model forward calls, prefill included (a CFG forward over all branches counts once)
    steps: int  # denoising forward calls (nfe without the prefill)
    # [S, gen_length] the denoising step, counted within its block, at which each position was accepted (-1: never,
    # after an early stop): the sampler's trajectory, which path distillation trains on (training/backbone_distill)
    reveal: torch.Tensor | None = None


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Variable-length prompts -> (ids [R, P] left-padded with pad_id, valid [R, P]); pads are masked out of
    attention and the real tokens keep positions 0.. (sglang-omni's CFG layout)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for r, p in enumerate(prompts):  # once per prompt, not per token
        if p:
            ids[r, width - len(p):] = torch.as_tensor(p, dtype=torch.long, device=device)
            valid[r, width - len(p):] = True
    return ids, valid


def _extend(cache, kv, n: int):
    new = [(k[:, :, :n], v[:, :, :n]) for k, v in kv]
    if cache is None:
        return new
    return [(torch.cat([ck, k], 2), torch.cat([cv, v], 2)) for (ck, cv), (k, v) in zip(cache, new)]


@torch.no_grad()
def decode_blocks(model, prompt_ids: torch.Tensor, prompt_valid: torch.Tensor | None = None, *, gen_length: int,
                  block_length: int, steps: int, mask_id: int, threshold: float = 1.0,
                  strategy: str = "low_confidence", temperature: float = 0.0, eos_id: int | None = None,
                  branches: int = 1, guide: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  vocab_range: tuple[int, int] | None = None,
                  generator: torch.Generator | None = None) -> DecodeResult:
    """prompt_ids [R, P] (R = branches x S, branch-major), prompt_valid [R, P] bool (None = all valid).
    guide: [R, Lb, V] -> [S, Lb, V], required when branches > 1. threshold >= 1 gives the fixed schedule;
    vocab_range (lo, hi) restricts proposals to ids [lo, hi) (applied before guidance)."""
    if block_length < 1 or steps < 1 or gen_length < 1:
        raise ValueError(f"block_length={block_length}, steps={steps}, gen_length={gen_length} must all be >= 1")
    device = prompt_ids.device
    rows, plen = prompt_ids.shape
    if rows % branches or (branches > 1 and guide is None):
        raise ValueError(f"{rows} prompt rows do not split into branches={branches} (each branch needs a row per "
                         f"sample, and branches > 1 needs a guide)")
    n = rows // branches
    if prompt_valid is None:
        prompt_valid = torch.ones_like(prompt_ids, dtype=torch.bool)
    total = plen + gen_length
    x = torch.cat([prompt_ids, torch.full((rows, gen_length), mask_id, dtype=torch.long, device=device)], 1)
    valid = torch.cat([prompt_valid.bool(), torch.ones((rows, gen_length), dtype=torch.bool, device=device)], 1)
    # Left padding takes position 0; real tokens count from 0, so a padded row matches its unpadded self.
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    todo = torch.zeros((rows, total), dtype=torch.bool, device=device)
    todo[:, plen:] = True  # positions still to generate (identical in every branch)
    reveal = torch.full((n, total), -1, dtype=torch.long, device=device)

    cache, nfe, denoise = None, 0, 0
    start_block = plen // block_length
    pending = start_block * block_length  # indices [cached, pending) are clean but not yet cached
    cached = 0
    if pending > 0:  # prefill the full prompt blocks
        out = model(input_ids=x[:, :pending], position_ids=positions[:, :pending],
                    attention_mask=block_causal_mask(torch.arange(pending, device=device), valid[:, :pending],
                                                     block_length),
                    use_cache=True)
        cache, cached, nfe = _extend(None, out.kv, pending), pending, 1
    stopped_at = total
    for b in range(start_block, -(-total // block_length)):
        s, e = b * block_length, min((b + 1) * block_length, total)
        for step in range(steps):
            block_todo = todo[:, s:e]
            if not bool(block_todo.any()):
                break
            q_index = torch.arange(cached, e, device=device)
            out = model(input_ids=x[:, cached:e], position_ids=positions[:, cached:e],
                        attention_mask=block_causal_mask(q_index, valid[:, :e], block_length),
                        past_kv=cache, use_cache=True)
            nfe, denoise = nfe + 1, denoise + 1
            if cached < s:  # the finished previous block rode along: keep its clean keys/values
                cache, cached = _extend(cache, out.kv, s - cached), s
            logits = out.logits[:, -(e - s):]
            if vocab_range is not None:
                logits = logits[..., vocab_range[0]:vocab_range[1]]
            if guide is not None:
                logits = guide(logits)
            tokens, p, score = propose(logits, strategy, temperature, generator)
            if vocab_range is not None:
                tokens = tokens + vocab_range[0]
            sample_todo = block_todo[:n]
            chosen = accept(sample_todo, p, score, scheduled_count(sample_todo, steps - step), threshold)
            chosen, tokens = chosen.repeat(branches, 1), tokens.repeat(branches, 1)
            reveal[:, s:e] = torch.where(chosen[:n], step, reveal[:, s:e])
            x[:, s:e] = torch.where(chosen, tokens, x[:, s:e])
            todo[:, s:e] &= ~chosen
        if eos_id is not None:
            if bool((x[:n, plen:e] == eos_id).any(-1).all()):
                stopped_at = e
                break
    out_tokens = x[:n, plen:].clone()
    if stopped_at < total and eos_id is not None:
        out_tokens[:, stopped_at - plen:] = eos_id
    lengths = torch.full((n,), gen_length, dtype=torch.long, device=device)
    if eos_id is not None:
        is_eos = out_tokens == eos_id
        lengths = torch.where(is_eos.any(-1), is_eos.long().argmax(-1), lengths)
    return DecodeResult(tokens=out_tokens, lengths=lengths, nfe=nfe, steps=denoise, reveal=reveal[:, plen:])
