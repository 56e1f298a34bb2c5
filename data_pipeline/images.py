"""(pixels, VQ ids) pairs from raw shards, for training the diffusion decoder on what the tokenizer produces."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.image_tokenizer.raw_images import iter_raw_images
from data_pipeline.image_tokenizer.load import load_image_tokenizer
from data_pipeline.image_tokenizer.prepare import pixel_values, sized_image
from data_pipeline.image_tokenizer.preprocess import to_pixel_values


def iter_image_token_pairs(dcfg, split: str = "train", batch_size: int | None = None, limit: int | None = None,
                           dedupe: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Yield (pixels [3, H, W] float32 in [-1, 1] at the generation resolution, VQ ids LongTensor [gh, gw], meta)
    for every image of the raw split, in shard order. Images are prepared like generation targets
    (`prepare`, mode generate) and tokenized in batches grouped by size by the tokenizer at
    data.image_tokenizer.path, with its own normalisation; the decoder's target stays [-1, 1] pixels whatever that
    normalisation is. `meta` carries the sample's metadata (shapes scene)."""
    icfg = dcfg.image_tokenizer
    tok = load_image_tokenizer(icfg.path)
    bs = batch_size or icfg.batch_size
    buf: list[tuple] = []

    def flush():
        ids = tok.encode_images([px for _, px, _ in buf], bs)
        out = [(to_pixel_values(sized), i.long(), m) for (sized, _, m), i in zip(buf, ids)]
        buf.clear()
        return out

    for _, img, meta in iter_raw_images(Path(dcfg.raw_dir) / split, dcfg, limit=limit, dedupe=dedupe):
        sized = sized_image(img, tok, icfg, "generate")
        buf.append((sized, pixel_values(sized, tok), meta))
        if len(buf) >= bs * 4:
            yield from flush()
    if buf:
        yield from flush()
