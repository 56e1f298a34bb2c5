"""Image-text pairs for the SigLIP phase, from the raw shards: every caption pair, and every image of an interleaved
document with the text segment that follows it (VQA samples are skipped: a question is not a description).

Images are resized to the square `data.image_tokenizer.image_size` (the position table's own grid, so no
resampling) so that one step is one batch tensor; shapes-world images are that size already. The whole split is
held in memory: this is the toy path (the quickstart sample: 3,772 pairs of 64x64 pixels, 185 MB float32); a
web-scale run would stream shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from data_pipeline.image_tokenizer.prepare import pixel_values
from data_pipeline.image_tokenizer.preprocess import to_rgb
from data_pipeline.image_tokenizer.raw_images import iter_raw_samples
from data_pipeline.text_tokenizer import load_text_tokenizer, text_tokenizer_path


@dataclass
class Pairs:
    pixels: torch.Tensor  # [N, 3, S, S], the tokenizer's normalisation
    ids: torch.Tensor  # [N, L] text token ids, 0 after each caption
    lengths: torch.Tensor  # [N] caption lengths (>= 1)
    vocab_size: int

    def __len__(self) -> int:
        return len(self.lengths)


def iter_pairs(split_dir: Path, dcfg):
    """(PIL image, its text) for the caption pairs and interleaved documents of a raw split, in shard order."""
    for s in iter_raw_samples(split_dir, dcfg):
        if s.kind == "caption":
            yield s.images[0], s.texts[0]
        elif s.kind == "interleaved":
            for at, (what, i) in enumerate(s.order):
                nxt = s.order[at + 1] if at + 1 < len(s.order) else None
                if what == "image" and nxt is not None and nxt[0] == "text":
                    yield s.images[i], s.texts[nxt[1]]


def load_pairs(dcfg, tokenizer, max_len: int, split: str = "train") -> Pairs:
    size = dcfg.image_tokenizer.image_size
    text_tok = load_text_tokenizer(text_tokenizer_path(dcfg))
    pixels, texts = [], []
    for img, text in iter_pairs(Path(dcfg.raw_dir) / split, dcfg):
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        pixels.append(pixel_values(img, tokenizer))
        texts.append(text)
    if not pixels:
        raise FileNotFoundError(f"no caption pairs or interleaved documents under {Path(dcfg.raw_dir) / split}: set "
                                f"data.raw_dir or run `unidiff data make-sample`")
    encoded = [t[:max_len] for t in text_tok.encode_batch(texts)]
    ids = torch.zeros(len(encoded), max_len, dtype=torch.long)
    for row, t in enumerate(encoded):
        ids[row, :len(t)] = torch.tensor(t, dtype=torch.long)
    lengths = torch.tensor([max(1, len(t)) for t in encoded])
    return Pairs(torch.stack(pixels), ids, lengths, text_tok.vocab_size)


def batch_rows(n: int, global_batch: int, step: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of step `step`'s global batch: a seeded draw without replacement per step, so the batch of a
    step depends on nothing but (seed, step) and a resumed run continues the uninterrupted order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    rows = torch.randperm(n, generator=g)[:global_batch]
    per = global_batch // world
    return rows[rank * per:(rank + 1) * per]
