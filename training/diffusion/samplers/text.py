"""Text generation (understanding answers, captions): block decoding with threshold acceptance and EOS early stop."""
from __future__ import annotations

import torch

from training.diffusion.samplers.decode import DecodeResult, decode_blocks, left_pad
from training.diffusion.samplers.settings import SamplerSettings


def generate_text(model, prompts: list[list[int]], settings: SamplerSettings, *, mask_id: int, eos_id: int | None,
                  generator: torch.Generator | None = None, device=None) -> DecodeResult:
    """prompts: token id lists (chat layout up to `<role>ASSISTANT</role>`), left-padded to one length.
    Returns DecodeResult with tokens [S, settings.gen_length]; `lengths` counts the tokens before the first EOS."""
    ids, valid = left_pad(prompts, mask_id, device)
    s = settings
    return decode_blocks(model, ids, valid, gen_length=s.gen_length, block_length=s.block_length, steps=s.steps,
                         mask_id=mask_id, threshold=s.threshold, strategy=s.strategy, temperature=s.temperature,
                         eos_id=eos_id, generator=generator)
