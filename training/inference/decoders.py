"""A trained decoder as a function of token grids: VQ ids [B, gh, gw] -> images [B, 3, H, W] in [-1, 1].

The decoding itself is `training.decoder.decode.decode_tokens` (the decoder's own sampler and steps, from its
checkpoint meta); this wraps a loaded decoder so evals and `unidiff generate` call it alike.
"""
from __future__ import annotations

import torch


def decoder_fn(source, steps: int = 0):
    """A checkpoint dir (or an already loaded (model, meta), e.g. another decoder_fn's `.loaded`) -> callable
    ids [B, gh, gw] -> images [B, 3, H, W] in [-1, 1] (its own sampler; its own steps unless `steps`)."""
    from training.decoder.decode import decode_tokens, load_decoder

    model, meta = source if isinstance(source, tuple) else load_decoder(source)

    def decode(ids: torch.Tensor) -> torch.Tensor:
        return decode_tokens(model, ids.long(), steps=decode.steps, sampler=meta.get("sampler"))

    decode.steps = steps or meta.get("steps")
    decode.loaded = (model, meta)
    return decode
