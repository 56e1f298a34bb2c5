"""(pixels, VQ ids) pairs from raw shards, for training the diffusion decoder on what the tokenizer produces."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from data_pipeline.image_tokenizer.fit_codebook import iter_raw_images
from data_pipeline.image_tokenizer.load import load_image_tokenizer
from data_pipeline.image_tokenizer.preprocess import generate_crop_size_list, to_pixel_values, var_center_crop


def iter_image_token_pairs(dcfg, split: str = "train", batch_size: int | None = None, limit: int | None = None,
                           dedupe: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """Yield (pixels [3, H, W] float32 in [-1, 1] at the generation resolution, VQ ids LongTensor [gh, gw], meta)
    for every image of the raw split, in shard order. Images are cropped like generation targets
    (var_center_crop on the resize_factor lattice with gen_max_patches cells) and tokenized in batches grouped by
    size by the tokenizer at data.image_tokenizer.path. `meta` carries the sample's metadata (shapes scene)."""
    icfg = dcfg.image_tokenizer
    tok = load_image_tokenizer(icfg.path)
    sizes = generate_crop_size_list(icfg.gen_max_patches, icfg.resize_factor)
    bs = batch_size or icfg.batch_size
    buf: list[tuple[torch.Tensor, dict]] = []

    def flush():
        ids = tok.encode_images([p for p, _ in buf], bs)
        out = [(p, i.long(), m) for (p, m), i in zip(buf, ids)]
        buf.clear()
        return out

    for _, img, meta in iter_raw_images(Path(dcfg.raw_dir) / split, dcfg, limit=limit, dedupe=dedupe):
        buf.append((to_pixel_values(var_center_crop(img, sizes, scale=True), tok.mean[0], tok.std[0]), meta))
        if len(buf) >= bs * 4:
            yield from flush()
    if buf:
        yield from flush()
