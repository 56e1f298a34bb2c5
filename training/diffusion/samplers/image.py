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
from training.diffusion.samplers.settings import SamplerSettings


@dataclass
class ImageResult:
    codes: torch.Tensor  # [S, gh, gw] VQ codebook ids (LLM id - image_token_offset)
    ids: torch.Tensor  # [S, gh * gw] LLM token ids
    nfe: int  # forward calls (all guidance branches share one call)
    steps: int = 0  # denoising forward calls (nfe without the prefill)


def _decode_image(model, prompts, guide, grid, settings: SamplerSettings, *, samples, mask_id, image_offset,
                  codebook_size, generator, device) -> ImageResult:
    gh, gw = grid
    s = settings
    rows = [p for p in prompts for _ in range(samples)]  # branch-major
    ids, valid = left_pad(rows, mask_id, device)
    res = decode_blocks(model, ids, valid, gen_length=gh * gw, block_length=s.block_length, steps=s.image_steps,
                        mask_id=mask_id, threshold=s.threshold, strategy=s.strategy, temperature=s.temperature,
                        branches=len(prompts), guide=guide,
                        vocab_range=(image_offset, image_offset + codebook_size), generator=generator)
    return ImageResult(codes=(res.tokens - image_offset).view(-1, gh, gw), ids=res.tokens, nfe=res.nfe,
                       steps=res.steps)


def generate_image(model, cond_prompt: list[int], uncond_prompt: list[int] | None, grid: tuple[int, int],
                   settings: SamplerSettings, *, mask_id: int, image_offset: int, codebook_size: int,
                   samples: int = 1, generator: torch.Generator | None = None, device=None) -> ImageResult:
    """Prompts end with the image header `<|image|><h><w><boi>`; uncond_prompt None = no guidance. Guidance:
    settings.cfg_scale, cfg_rescale; settings.image_steps per block."""
    if uncond_prompt is None:
        prompts, guide = [cond_prompt], None
    else:
        prompts = [cond_prompt, uncond_prompt]

        def guide(logits):
            cond, uncond = logits.chunk(2)
            return cfg_guidance(cond, uncond, settings.cfg_scale, settings.cfg_rescale)
    return _decode_image(model, prompts, guide, grid, settings, samples=samples, mask_id=mask_id,
                         image_offset=image_offset, codebook_size=codebook_size, generator=generator, device=device)


def edit_image(model, cond_prompt: list[int], no_text_prompt: list[int], no_image_prompt: list[int],
               grid: tuple[int, int], settings: SamplerSettings, *, mask_id: int, image_offset: int,
               codebook_size: int, samples: int = 1, generator: torch.Generator | None = None,
               device=None) -> ImageResult:
    """Editing: the output grid equals the source grid; three-way guidance (settings.text_scale, image_scale)."""
    def guide(logits):
        cond, no_text, no_image = logits.chunk(3)
        return edit_guidance(cond, no_text, no_image, settings.text_scale, settings.image_scale)

    return _decode_image(model, [cond_prompt, no_text_prompt, no_image_prompt], guide, grid, settings,
                         samples=samples, mask_id=mask_id, image_offset=image_offset, codebook_size=codebook_size,
                         generator=generator, device=device)
