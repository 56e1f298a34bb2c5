"""Shared pieces of the eval tests: a tiny config, the sample tokenizer, a random image tokenizer, held-out shapes
items, and contexts around reference models (oracle / uniform)."""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**eval_overrides):
    from training.config import load_config

    over = [f"eval.{k}={v}" for k, v in eval_overrides.items()] + ["tracking.wandb=disabled", "eval.progress=false"]
    return load_config(ROOT / "configs/model/tiny.yaml", over)


@lru_cache(maxsize=1)
def tokenizers(tmp: str):
    """(text tokenizer, specials, image tokenizer) at the tiny preset's sizes (2048 text ids + 256 codes)."""
    import random

    from data_pipeline import layout, shapes
    from data_pipeline.image_tokenizer import build_image_tokenizer
    from data_pipeline.shard_tokenizer import CAPTION_PROMPT
    from data_pipeline.text_tokenizer import build_sample_tokenizer

    cfg = tiny_cfg()
    texts = [layout.SYSTEM_UNDERSTAND, layout.SYSTEM_T2I, "SYSTEM HUMAN ASSISTANT", CAPTION_PROMPT]
    for i in range(200):
        sc = shapes.scene_for(0, "train", i)
        rng = random.Random(i)
        texts += [shapes.caption(sc, rng)] + [f"{q.question} {q.answer}" for q in shapes.questions(sc)]
    texts += [" ".join(["top", "middle", "bottom", "left", "center", "right", "yes", "no"])]
    tok = build_sample_tokenizer(texts, Path(tmp) / "tokenizer.json", vocab_size=2048)
    specials = layout.SpecialTokens.from_tokenizer(tok)
    return tok, specials, build_image_tokenizer(cfg.data.image_tokenizer)


def heldout(tmp: str, n: int = 8):
    from evals.heldout import build_shapes_heldout

    cfg = tiny_cfg()
    tok, specials, itok = tokenizers(tmp)
    return build_shapes_heldout(cfg, tok, specials, itok, n)


def oracle_targets(tmp: str, ho, offset: int = 2048) -> list[list[int]]:
    """Every full target sequence the oracle must know: vqa (= choice) answers, captions, t2i codes, elbo docs."""
    tok, specials, _ = tokenizers(tmp)
    targets = [it.prompt + tok.encode(it.reference) + [specials.eos] for it in ho.vqa + ho.caption]
    targets += [it.cond + (r.ids.flatten() + offset).tolist() + [specials.image_end, specials.eos]
                for it, r in zip(ho.t2i, ho.recon)]
    targets += [it.ids.tolist() for it in ho.elbo]
    return targets


def oracle_model(tmp: str, ho):
    from evals.reference_models import OracleModel

    _, specials, _ = tokenizers(tmp)
    return OracleModel(oracle_targets(tmp, ho), 2304, specials.mask, specials.eos)


def oracle_decoder(ho):
    """ids [B, gh, gw] -> the rendered scene whose tokens these are (exact lookup), in [-1, 1]."""
    from data_pipeline import shapes
    from data_pipeline.image_tokenizer.preprocess import to_pixel_values

    table = {tuple(r.ids.flatten().tolist()): to_pixel_values(shapes.render(t.scene)) for r, t in zip(ho.recon, ho.t2i)}

    def decode(ids):
        return torch.stack([table.get(tuple(x.flatten().tolist()), torch.zeros(3, 64, 64)) for x in ids])

    return decode


def context(tmp: str, model, ho, decoders=None, **eval_overrides):
    from evals.context import EvalContext

    cfg = tiny_cfg(**eval_overrides)
    tok, specials, itok = tokenizers(tmp)
    return EvalContext(cfg=cfg, model=model, specials=specials, tokenizer=tok, image_tokenizer=itok,
                       decoders=decoders or {}, data=ho)
