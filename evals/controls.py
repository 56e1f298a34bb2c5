"""The controls every understanding task (vqa, choice, caption) reports beside chance, so that "the model looks at
the image" is a measured claim rather than a reading of one accuracy:

- answer prior: the best a model can do from the question alone, i.e. always giving the most frequent reference
  answer of the question type among these items (for caption: another item's reference, the template alone);
- image-blind: the same model on the same items with every image token of the prompt replaced by the mask token.
  The image block's frame (<|image|>, the grid-size tokens, <boi>, <|/image|>) stays, so the prompt's layout and
  length are unchanged and only what the image says is gone. Costs a second pass over the items (`eval.image_blind`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter


def blind_prompt(prompt: list[int], image_offset: int, codebook_size: int, mask_id: int) -> list[int]:
    lo, hi = image_offset, image_offset + codebook_size
    return [mask_id if lo <= int(t) < hi else int(t) for t in prompt]


def blinded(ctx, items: list) -> list:
    """Copies of held-out items (anything with a `prompt`) whose prompts have no image tokens left."""
    return [dataclasses.replace(it, prompt=blind_prompt(it.prompt, ctx.image_offset, ctx.codebook_size,
                                                        ctx.specials.mask)) for it in items]


def answer_prior(answers: list[str], qtypes: list[str]) -> tuple[float, dict[str, float]]:
    """(overall, per type): the share of items whose answer is their type's most frequent one."""
    by_type: dict[str, Counter] = {}
    for a, q in zip(answers, qtypes):
        by_type.setdefault(q, Counter())[a] += 1
    per = {q: c.most_common(1)[0][1] / sum(c.values()) for q, c in by_type.items()}
    overall = sum(c.most_common(1)[0][1] for c in by_type.values()) / max(len(answers), 1)
    return overall, per
