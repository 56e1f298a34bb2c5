"""Text-to-image and editing: gh*gw VQ tokens after the prompt's `<|image|><h><w><boi>` header, decoded block by
block with logit-space classifier-free guidance; proposals restricted to the image codebook ids.

T2I: two branches [conditional; unconditional prompt with the caption replaced by `<uncondition>`], the shorter one
left-padded with masks that are masked out of attention. Editing: three branches [conditional; no instruction;
no source image] combined by `edit_guidance`. All branches run in one batched forward per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.diffusion.samplers.common import cfg_guidance, edit_guidance
from training.diffusion.samplers.decode import decode_blocks, left_pad


@dataclass
class ImageResult:
    codes: torch.Tensor  # [S, gh, gw] VQ codebook ids (LLM id - image_token_offset)
    ids: torch.Tensor  # [S, gh * gw] LLM token ids
    nfe: int  # forward calls (all guidance branches share one call)


def _decode_image(model, prompts, guide, grid, *, samples, mask_id, image_offset, codebook_size, steps,
                  block_length, threshold, strategy, temperature, generator, device) -> ImageResult:
    gh, gw = grid
    rows = [p for p in prompts for _ in range(samples)]  # branch-major
    ids, valid = left_pad(rows, mask_id, device)
    res = decode_blocks(model, ids, valid, gen_length=gh * gw, block_length=block_length, steps=steps,
                        mask_id=mask_id, threshold=threshold, strategy=strategy, temperature=temperature,
                        branches=len(prompts), guide=guide,
                        vocab_range=(image_offset, image_offset + codebook_size), generator=generator)
    return ImageResult(codes=(res.tokens - image_offset).view(-1, gh, gw), ids=res.tokens, nfe=res.nfe)


def generate_image(model, cond_prompt: list[int], uncond_prompt: list[int] | None, grid: tuple[int, int], *,
                   mask_id: int, image_offset: int, codebook_size: int, cfg_scale: float = 2.0,
                   cfg_rescale: float = 0.0, samples: int = 1, steps: int = 8, block_length: int = 32,
                   threshold: float = 0.95, strategy: str = "low_confidence", temperature: float = 0.0,
                   generator: torch.Generator | None = None, device=None) -> ImageResult:
    """Prompts end with the image header `<|image|><h><w><boi>`; uncond_prompt None = no guidance."""
    if uncond_prompt is None:
        prompts, guide = [cond_prompt], None
    else:
        prompts = [cond_prompt, uncond_prompt]

        def guide(logits):
            cond, uncond = logits.chunk(2)
            return cfg_guidance(cond, uncond, cfg_scale, cfg_rescale)
    return _decode_image(model, prompts, guide, grid, samples=samples, mask_id=mask_id, image_offset=image_offset,
                         codebook_size=codebook_size, steps=steps, block_length=block_length, threshold=threshold,
                         strategy=strategy, temperature=temperature, generator=generator, device=device)


def edit_image(model, cond_prompt: list[int], no_text_prompt: list[int], no_image_prompt: list[int],
               grid: tuple[int, int], *, mask_id: int, image_offset: int, codebook_size: int,
               text_scale: float = 4.0, image_scale: float = 0.0, samples: int = 1, steps: int = 8,
               block_length: int = 32, threshold: float = 0.95, strategy: str = "low_confidence",
               temperature: float = 0.0, generator: torch.Generator | None = None, device=None) -> ImageResult:
    """Editing: the output grid equals the source grid; three-way guidance (text scale, image scale)."""
    def guide(logits):
        cond, no_text, no_image = logits.chunk(3)
        return edit_guidance(cond, no_text, no_image, text_scale, image_scale)

    return _decode_image(model, [cond_prompt, no_text_prompt, no_image_prompt], guide, grid, samples=samples,
                         mask_id=mask_id, image_offset=image_offset, codebook_size=codebook_size, steps=steps,
                         block_length=block_length, threshold=threshold, strategy=strategy,
                         temperature=temperature, generator=generator, device=device)
