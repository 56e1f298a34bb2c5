"""Held-out items for every task, as plain token lists and tensors (so a test can build them by hand).

`build_shapes_heldout` regenerates the held-out split of the procedural shapes world from its seed: the scene ids,
captions and questions are exactly those `unidiff data make-sample` wrote into the `val` raw shards (same
`scene_for(seed, split, i)` and the same per-scene text RNG), so the answer key comes from `data_pipeline.shapes`
and never from the model's training data. Images are tokenized with the configured image tokenizer by the recipe
pretokenize uses (`data_pipeline.image_tokenizer.prepare`: understanding resize for prompts, generation crop for
targets, the tokenizer's own mean/std), and sequences are built with the official layout builders of
`data_pipeline.layout`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from evals.likelihood import LikelihoodItem


@dataclass
class ChoiceItem:
    prompt: list[int]  # chat prompt up to <role>ASSISTANT</role>
    candidates: list[list[int]]  # answer token ids (each ends with EOS, as the training answers do)
    answer: int  # index of the correct candidate
    qtype: str = ""
    key: int = 0
    labels: list[str] = field(default_factory=list)  # candidate strings (for the report)


@dataclass
class GenItem:
    prompt: list[int]
    reference: str  # expected answer (vqa) or reference caption
    qtype: str = ""
    key: int = 0
    question: str = ""  # the prompt's text part (for reports and adapters)


@dataclass
class T2IItem:
    cond: list[int]  # prompt ending with <|image|><h><w><boi>
    uncond: list[int]  # same with the caption replaced by <uncondition>
    grid: tuple[int, int]
    scene: object  # data_pipeline.shapes.Scene: the answer key for the detector
    caption: str = ""
    key: int = 0


@dataclass
class ReconItem:
    image: torch.Tensor  # [3, H, W] in [-1, 1]
    ids: torch.Tensor  # [gh, gw] VQ ids of that image
    key: int = 0


@dataclass
class HeldOut:
    elbo: list[LikelihoodItem] = field(default_factory=list)
    choice: list[ChoiceItem] = field(default_factory=list)
    vqa: list[GenItem] = field(default_factory=list)
    caption: list[GenItem] = field(default_factory=list)
    t2i: list[T2IItem] = field(default_factory=list)
    recon: list[ReconItem] = field(default_factory=list)
    source: str = "custom"


def answer_set(qtype: str, max_shapes: int = 3) -> list[str]:
    """Every answer a shapes question of this type can have (the candidate set of `choice`, the chance level)."""
    from data_pipeline import shapes

    if qtype == "count":
        return list(shapes.NUMBER_WORDS[1:max_shapes + 1])
    if qtype == "colour":
        return list(shapes.COLOURS)
    if qtype == "shape":
        return list(shapes.KINDS)
    if qtype == "position":
        return ["center" if (r, c) == (1, 1) else f"{shapes.ROW_NAMES[r]} {shapes.COL_NAMES[c]}"
                for r in range(shapes.GRID) for c in range(shapes.GRID)]
    if qtype == "relative":
        return ["yes", "no"]
    raise ValueError(f"unknown shapes question type {qtype!r}")


def read_token_shards(token_dir, split: str, n: int) -> list[LikelihoodItem]:
    """The first n token samples of `token_dir/<split>/*.tar` (written by `unidiff pretokenize`), in shard order,
    as likelihood items over their maskable positions; [] if there are none."""
    import io
    from pathlib import Path

    import numpy as np

    from data_pipeline.formats import iter_tar_samples

    items: list[LikelihoodItem] = []
    for shard in sorted((Path(token_dir) / split).glob("*.tar")):
        for key, members, err in iter_tar_samples(shard):
            if err:
                raise ValueError(f"token shard {shard} is damaged at {key}: {err}; rerun `unidiff pretokenize`")
            arr = {k: np.load(io.BytesIO(members[f"{k}.npy"])) for k in ("ids", "maskable", "modality")}
            items.append(LikelihoodItem(torch.as_tensor(arr["ids"].astype(np.int64)),
                                        torch.as_tensor(arr["maskable"].astype(bool)),
                                        torch.as_tensor(arr["modality"] == 1), len(items)))
            if len(items) >= n:
                return items
    return items


def build_shapes_heldout(cfg, tok, specials, image_tokenizer, n: int, caption_prompt: str = "",
                         split: str = "val", progress: bool = False) -> HeldOut:
    """n held-out scenes -> items of every task (elbo: one joint image+caption document per scene; replaced by the
    held-out token shards when `data.token_dir/<split>` has them)."""
    from tqdm import tqdm

    from data_pipeline import layout, shapes
    from data_pipeline.image_tokenizer.prepare import tokenize_image
    from data_pipeline.image_tokenizer.preprocess import to_pixel_values

    if not caption_prompt:
        from data_pipeline.shard_tokenizer import CAPTION_PROMPT as caption_prompt

    scfg, icfg = cfg.data.sample, cfg.data.image_tokenizer
    offset = int(cfg.model.image_token_offset)
    ho = HeldOut(source=f"shapes/{split} seed={scfg.seed}")
    for i in tqdm(range(n), desc="held-out shapes", disable=not progress, leave=False):
        scene = shapes.scene_for(scfg.seed, split, i, scfg.image_size)
        rng = random.Random(f"{scfg.seed}/{split}/{i}/text")  # the same stream make-sample used
        cap = shapes.caption(scene, rng)
        qa = shapes.pick_question(scene, rng)
        img = shapes.render(scene)
        _, u_ids = tokenize_image(img, image_tokenizer, icfg, "understand")
        g_img, g_ids = tokenize_image(img, image_tokenizer, icfg, "generate")
        image = [(u_ids, *u_ids.shape)]
        q_prompt = layout.chat_prompt(tok, specials, offset, layout.SYSTEM_UNDERSTAND, qa.question, image)
        ho.vqa.append(GenItem(q_prompt, qa.answer, qa.qtype, i, qa.question))
        labels = answer_set(qa.qtype)
        ho.choice.append(ChoiceItem(q_prompt, [tok.encode(a) + [specials.eos] for a in labels],
                                    labels.index(qa.answer), qa.qtype, i, labels))
        ho.caption.append(GenItem(layout.chat_prompt(tok, specials, offset, layout.SYSTEM_UNDERSTAND, caption_prompt,
                                                     image), cap, "caption", i, caption_prompt))
        gh, gw = g_ids.shape
        ho.t2i.append(T2IItem(layout.t2i_prompt(tok, specials, offset, cap, gh, gw),
                              layout.t2i_prompt(tok, specials, offset, cap, gh, gw, uncondition=True), (gh, gw),
                              scene, cap, i))
        ho.recon.append(ReconItem(to_pixel_values(g_img), g_ids, i))  # the decoders' target: [-1, 1] pixels
        doc = layout.build_interleaved(tok, specials, offset, [("image", u_ids, *u_ids.shape), ("text", cap)])
        ho.elbo.append(LikelihoodItem(torch.as_tensor(doc.ids, dtype=torch.long), torch.as_tensor(doc.maskable),
                                      torch.as_tensor(doc.modality == layout.IMAGE), i))
    shard_items = read_token_shards(cfg.data.token_dir, split, n)
    if shard_items:
        ho.elbo = shard_items
        ho.source += f"; elbo from token shards {cfg.data.token_dir}/{split}"
    return ho
