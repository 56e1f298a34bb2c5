"""The diffusion decoder's (pixels, VQ ids) pairs out of a token dir, with no image tokenizer forward.

The ids are pretokenize's own generation-crop ids (`gen.npy` on the first token sample of each raw sample, with
a pointer per image in its json, shard_tokenizer.py), so the decoder learns to draw exactly the ids the backbone
learns to generate. The pixels are read back from the raw shard the token shard's index names (looked up by name
among data.raw_dir / data.{split}_shards, over any transport), decoded and cropped by the one generation recipe
(`prepare.resize`); the sha1 pretokenize stored catches a raw shard that changed since.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from data_pipeline.formats import ImageLimits, Quarantine, decode_image
from data_pipeline.image_tokenizer.prepare import resize
from data_pipeline.image_tokenizer.preprocess import to_pixel_values
from data_pipeline.manifest import load_manifest
from data_pipeline.sources import ShardReader, list_raw_shards


def _read(url: str, what: str):
    reader = ShardReader(url)
    for key, members, err in reader:
        if err:
            raise ValueError(f"{what} {url} is damaged ({err}): rerun `unidiff pretokenize`")
        yield key, members
    if reader.failed:
        raise OSError(f"{what} {url} could not be read: {reader.failed}")


def _wanted(token_shard: Path) -> dict[str, list[tuple[str, str, np.ndarray]]]:
    """{raw sample key: [(raw image member, sha1, ids [gh, gw])]} of one token shard."""
    out = {}
    for _, m in _read(str(token_shard), "token shard"):
        if "gen.npy" not in m:
            continue
        info = json.loads(m["json"])
        flat, at, grids = np.load(io.BytesIO(m["gen.npy"]), allow_pickle=False), 0, []
        for g in info["gen"]:
            gh, gw = g["grid"]
            grids.append((g["member"], g["sha1"], flat[at:at + gh * gw].reshape(gh, gw)))
            at += gh * gw
        out[info["meta"]["source_key"]] = grids
    return out


def iter_generation_pairs(dcfg, split: str = "train",
                          dedupe: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels [3, H, W] float32 in [-1, 1] at the generation crop, VQ ids LongTensor [gh, gw]) for every image of
    the token dir's split, in shard and document order (dedupe: pixel-identical repeats once, e.g. the shapes
    scene shared by a caption pair and a VQA sample). The decoder's target is [-1, 1] pixels whatever the
    tokenizer's normalisation."""
    token_dir = Path(dcfg.token_dir)
    man = load_manifest(token_dir)
    if split not in man["splits"]:
        raise ValueError(f"{token_dir}/manifest.json has no split {split!r} (has {sorted(man['splits'])})")
    raw = {sh.name: sh for sh in list_raw_shards(dcfg) if sh.split == split}
    limits = ImageLimits(dcfg.max_input_pixels, dcfg.max_aspect)
    seen, found = set(), False
    for row in man["splits"][split]["shards"]:
        wanted = _wanted(token_dir / split / row["output"])
        if not wanted:
            continue
        found = True
        src = raw.get(row["input"])
        if src is None:
            raise FileNotFoundError(f"{split}/{row['output']}: its raw shard {row['input']} is not among "
                                    f"data.{split}_shards or {dcfg.raw_dir}/{split}; the decoder reads the pixels "
                                    f"of its pairs from the raw shards pretokenize read")
        for key, members in _read(src.url, "raw shard"):
            for member, sha, ids in wanted.pop(key, ()):
                data = members.get(member, b"")
                if hashlib.sha1(data).hexdigest()[:16] != sha:
                    raise ValueError(f"raw shard {src.url}: {key}.{member} is not what pretokenize read (sha1 "
                                     f"differs): the raw shard changed; rerun `unidiff pretokenize`")
                try:
                    img = decode_image(data, limits)
                except Quarantine as q:
                    raise ValueError(f"raw shard {src.url}: {key}.{member}: {q} (data.max_input_pixels / "
                                     f"data.max_aspect changed since pretokenize?)") from None
                if dedupe:
                    h = hashlib.sha1(img.tobytes()).digest() + repr(img.size).encode()
                    if h in seen:
                        continue
                    seen.add(h)
                yield to_pixel_values(resize(img, dcfg.image_tokenizer, "generate")), torch.from_numpy(
                    ids.astype(np.int64))
        if wanted:
            raise ValueError(f"raw shard {src.url} lacks samples pretokenize read ({sorted(wanted)[:3]}): it "
                             f"changed; rerun `unidiff pretokenize`")
    if not found:
        raise ValueError(f"{token_dir} split {split!r} has no decoder pairs: pretokenize with "
                         f"data.decoder_pairs=true")
