"""Training pairs for the decoder: (image [3, H, W] float in [-1, 1], VQ id grid [gh, gw] long).

`decoder_pairs(cfg, split, rank, world)` is the one place the data source is chosen:
- synthetic: each VQ id owns a colour and a pattern (flat, two gradients, a 2x2 checker) that fill its cell, plus a
  per-image brightness offset the ids do not determine. The decoder has a learnable, known answer, and still has
  a distribution to model (the offset), so sampling steps matter.
- shards: the token dir's decoder pairs (pretokenize stores every image's generation-crop ids and a pointer to its
  raw bytes; data_pipeline/generation_pairs.py): the ids the backbone learns, no second tokenization.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

_HOLDOUT_SEED_OFFSET = 1_000_003  # holdout draws from a disjoint seed stream


def _palette(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.data_seed)
    colours = torch.rand(cfg.codebook_size, 3, generator=g) * 1.6 - 0.8
    patterns = torch.randint(0, 4, (cfg.codebook_size,), generator=g)
    return colours, patterns


def render(ids: torch.Tensor, cfg, offset: torch.Tensor | None = None) -> torch.Tensor:
    """The known answer: images [B, 3, H, W] for id grids [B, gh, gw] (offset [B]: per-image brightness)."""
    colours, patterns = _palette(cfg)
    b, gh, gw = ids.shape
    cell = cfg.image_size // gh
    ramp = torch.linspace(-0.35, 0.35, cell)
    shapes = torch.stack([
        torch.zeros(cell, cell),
        ramp[:, None].expand(cell, cell),
        ramp[None, :].expand(cell, cell),
        0.35 * torch.sign(ramp[:, None] * ramp[None, :]),
    ])  # [4, cell, cell]
    col = colours[ids].permute(0, 3, 1, 2)  # [B, 3, gh, gw]
    pat = shapes[patterns[ids]]  # [B, gh, gw, cell, cell]
    img = col[..., None, None] + pat[:, None]
    img = img.permute(0, 1, 2, 4, 3, 5).reshape(b, 3, gh * cell, gw * cell)
    if offset is not None:
        img = img + offset.view(-1, 1, 1, 1)
    return img.clamp(-1, 1)


def synthetic_batch(cfg, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, cfg.codebook_size, (n, cfg.token_grid, cfg.token_grid), generator=generator)
    offset = (torch.rand(n, generator=generator) - 0.5) * 0.3
    return render(ids, cfg, offset), ids


def _shard_pairs(cfg, data_cfg, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The token dir's (pixels at the generation crop, VQ ids) pairs, kept in memory (toy scale). Only images whose
    crop matches the decoder's square image_size / token_grid are used; the rest are counted."""
    from data_pipeline.generation_pairs import iter_generation_pairs

    kept, skipped = [], 0
    for pixels, ids in iter_generation_pairs(data_cfg, split=split):
        if tuple(ids.shape) == (cfg.token_grid, cfg.token_grid) and pixels.shape[-1] == cfg.image_size:
            kept.append((pixels.to(torch.float16), ids))
        else:
            skipped += 1
    if not kept:
        raise ValueError(f"no {cfg.image_size}px / {cfg.token_grid}x{cfg.token_grid}-token pairs in "
                         f"{data_cfg.token_dir} split {split}: do decoder.image_size / decoder.token_grid match "
                         f"data.image_tokenizer (gen_max_patches, resize_factor, patch_size)?")
    if skipped:
        print(f"decoder pairs ({split}): {len(kept)} images used, {skipped} of other sizes skipped", flush=True)
    return kept


def decoder_pairs(cfg, split: str = "train", rank: int = 0, world: int = 1,
                  data_cfg=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (train) or finite (holdout: cfg.holdout pairs) iterator of single pairs for this data rank.
    data_cfg: the `data` section, needed for data_source=shards."""
    if cfg.data_source == "shards":
        if data_cfg is None:
            raise ValueError("decoder.data_source=shards needs the data section (data.token_dir, data.raw_dir or "
                             "data.*_shards)")
        if split == "holdout":
            for pixels, ids in _shard_pairs(cfg, data_cfg, "val")[:cfg.holdout]:
                yield pixels.float(), ids
            return
        pairs = _shard_pairs(cfg, data_cfg, "train")[rank::world]  # each data-parallel rank its own images
        g = torch.Generator().manual_seed(cfg.data_seed + rank)
        while True:  # epochs in a seeded order
            for i in torch.randperm(len(pairs), generator=g).tolist():
                yield pairs[i][0].float(), pairs[i][1]
    if split == "holdout":
        g = torch.Generator().manual_seed(cfg.data_seed + _HOLDOUT_SEED_OFFSET)
        images, ids = synthetic_batch(cfg, cfg.holdout, g)
        yield from zip(images, ids)
        return
    # Each data-parallel rank draws its own stream (keyed on rank), so ranks never train on the same pairs.
    g = torch.Generator().manual_seed(cfg.data_seed * 7919 + 104729 * (rank + 1) + world)
    while True:
        images, ids = synthetic_batch(cfg, 256, g)
        yield from zip(images, ids)


def batches(pairs: Iterator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stack single pairs into ([B, 3, H, W], [B, gh, gw]); a short last batch of a finite source is kept."""
    buf_x, buf_i = [], []
    for x, i in pairs:
        buf_x.append(x)
        buf_i.append(i)
        if len(buf_x) == batch_size:
            yield torch.stack(buf_x), torch.stack(buf_i)
            buf_x, buf_i = [], []
    if buf_x:
        yield torch.stack(buf_x), torch.stack(buf_i)
