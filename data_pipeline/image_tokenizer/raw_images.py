"""Raw images of a split as the tokenizer's fitting, training and probing read them: every valid raw sample in shard
order (damaged and quarantined ones are pretokenize's to report; these readers only skip them)."""
from __future__ import annotations

import hashlib
from pathlib import Path

from data_pipeline.formats import ImageLimits, Quarantine, iter_tar_samples, parse_sample


def iter_raw_samples(raw_split_dir: str | Path, dcfg):
    """Every valid raw sample (formats.RawSample) of a split, in shard order; damaged and quarantined ones skipped."""
    limits = ImageLimits(dcfg.max_input_pixels, dcfg.max_aspect)
    for shard in sorted(Path(raw_split_dir).glob("*.tar")):
        for key, members, err in iter_tar_samples(shard):
            if err:
                continue
            try:
                yield parse_sample(key, members, limits)
            except Quarantine:
                continue


def iter_raw_images(raw_split_dir: str | Path, dcfg, limit: int | None = None, dedupe: bool = False):
    """(key, PIL image, meta) for every image of every valid raw sample of a split, in shard order
    (dedupe: skip pixel-identical repeats, e.g. the shapes scene shared by a caption pair and a VQA sample)."""
    n, seen = 0, set()
    for s in iter_raw_samples(raw_split_dir, dcfg):
        for img in s.images:
            if dedupe:
                h = hashlib.sha1(img.tobytes()).digest() + repr(img.size).encode()
                if h in seen:
                    continue
                seen.add(h)
            yield s.key, img, s.meta
            n += 1
            if limit is not None and n >= limit:
                return
