"""Text generation (understanding answers): block decoding with threshold acceptance and EOS early stop."""
from __future__ import annotations

import torch

from training.diffusion.samplers.decode import DecodeResult, decode_blocks, left_pad


def generate_text(model, prompts: list[list[int]], *, mask_id: int, eos_id: int | None, gen_length: int = 256,
                  block_length: int = 32, steps: int = 32, threshold: float = 0.95,
                  strategy: str = "low_confidence", temperature: float = 0.0,
                  generator: torch.Generator | None = None, device=None) -> DecodeResult:
    """prompts: token id lists (chat layout up to `<role>ASSISTANT</role>`), left-padded to one length.
    Returns DecodeResult with tokens [S, gen_length]; `lengths` counts the tokens before the first EOS."""
    ids, valid = left_pad(prompts, mask_id, device)
    return decode_blocks(model, ids, valid, gen_length=gen_length, block_length=block_length, steps=steps,
                         mask_id=mask_id, threshold=threshold, strategy=strategy, temperature=temperature,
                         eos_id=eos_id, generator=generator)
