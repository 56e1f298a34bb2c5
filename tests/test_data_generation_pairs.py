"""The decoder's (pixels, VQ ids) pairs come from the token shards: equal to tokenizing the raw images again (the
path they replace), read with no image tokenizer forward, through the quickstart's decoder config; a changed raw
shard is an error; pretokenize's output does not depend on its number of tokenizer and worker processes."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from data_pipeline.formats import ImageLimits, Quarantine, iter_tar_samples, parse_sample, write_tar
from data_pipeline.generation_pairs import iter_generation_pairs
from data_pipeline.image_tokenizer.load import ImageTokenizer, load_image_tokenizer
from data_pipeline.image_tokenizer.prepare import pixel_values, sized_image
from data_pipeline.image_tokenizer.preprocess import to_pixel_values
from data_pipeline.pretokenize import pretokenize
from tests.conftest import ROOT
from tests.test_data_pipeline import data_env  # noqa: F401  (session fixture)
from tests.test_data_sources import tree
from training.config import load_config
from training.decoder.pairs import decoder_pairs

pytestmark = pytest.mark.e2e


def retokenized(d, split):
    """The replaced path: every raw image of the split once (pixel-identical repeats skipped), generation crop,
    tokenized by the image tokenizer."""
    tok, icfg = load_image_tokenizer(d.image_tokenizer.path), d.image_tokenizer
    seen, sized = set(), []
    for shard in sorted((Path(d.raw_dir) / split).glob("*.tar")):
        for key, members, err in iter_tar_samples(shard):
            try:
                s = parse_sample(key, members, ImageLimits(d.max_input_pixels, d.max_aspect))
            except Quarantine:
                continue
            for img in s.images:
                h = (img.tobytes(), img.size)
                if h not in seen:
                    seen.add(h)
                    sized.append(sized_image(img, tok, icfg, "generate"))
    ids = tok.encode_images([pixel_values(im, tok) for im in sized], icfg.batch_size)
    return [(to_pixel_values(im), i.long()) for im, i in zip(sized, ids)]


def test_pairs_from_the_shards_equal_a_second_tokenization_with_no_forward(data_env, monkeypatch):  # noqa: F811
    d, _, _ = data_env
    calls = []
    encode = ImageTokenizer.encode
    monkeypatch.setattr(ImageTokenizer, "encode", lambda self, px: calls.append(1) or encode(self, px))
    for split in ("val", "train"):
        ours = list(iter_generation_pairs(d, split))
        assert not calls, "reading the pairs ran the image tokenizer"
        ref = retokenized(d, split)
        assert len(ours) == len(ref) > 20
        for (px, ids), (rpx, rids) in zip(ours, ref):
            assert ids.dtype == torch.int64 and torch.equal(ids, rids)
            assert torch.equal(px, rpx)
        calls.clear()
    # several sizes: the photos' crops differ from the 64x64 shapes scenes
    assert len({tuple(i.shape) for _, i in ours}) > 1


def test_quickstart_decoder_config_reads_the_shard_pairs(data_env, monkeypatch):  # noqa: F811
    d, _, _ = data_env
    cfg = load_config(ROOT / "configs/experiments/quickstart.yaml", [
        f"data.raw_dir={d.raw_dir}", f"data.token_dir={d.token_dir}",
        f"data.image_tokenizer.path={d.image_tokenizer.path}"])
    assert cfg.decoder.data_source == "shards"
    want = [(px, i) for px, i in retokenized(d, "val")
            if tuple(i.shape) == (cfg.decoder.token_grid,) * 2 and px.shape[-1] == cfg.decoder.image_size]
    monkeypatch.setattr(ImageTokenizer, "encode", lambda *a: pytest.fail("decoder pairs ran the image tokenizer"))
    held = list(decoder_pairs(cfg.decoder, "holdout", data_cfg=cfg.data))
    assert len(held) == min(cfg.decoder.holdout, len(want)) > 0
    for (px, ids), (rpx, rids) in zip(held, want):
        assert torch.equal(ids, rids) and torch.equal(px, rpx.half().float())  # kept as fp16 in memory
    px, ids = next(decoder_pairs(cfg.decoder, "train", rank=0, world=2, data_cfg=cfg.data))
    assert px.shape == (3, cfg.decoder.image_size, cfg.decoder.image_size) and ids.shape == (8, 8)


def test_a_changed_raw_shard_is_an_error(data_env, tmp_path):  # noqa: F811
    d, _, _ = data_env
    shutil.copytree(Path(d.raw_dir) / "val", tmp_path / "raw/val")
    shard = sorted((tmp_path / "raw/val").glob("*.tar"))[0]
    samples = [(k, m) for k, m, _ in iter_tar_samples(shard)]
    k0, m0 = samples[0]
    ext = next(e for e in m0 if e.endswith("png"))
    m0[ext] = m0[ext] + b"\0"  # the same image to PIL, other bytes than pretokenize read
    write_tar(shard, samples, sort_members=False)
    with pytest.raises(ValueError, match=f"{k0}.{ext} is not what pretokenize read"):
        list(iter_generation_pairs(replace(d, raw_dir=str(tmp_path / "raw")), "val"))
    no_pairs = replace(d, raw_dir=str(tmp_path / "raw"), token_dir=str(tmp_path / "tok"), decoder_pairs=False,
                       text_tokenizer=str(Path(d.raw_dir) / "tokenizer.json"))
    pretokenize(no_pairs, progress=False)
    with pytest.raises(ValueError, match="no decoder pairs: pretokenize with data.decoder_pairs=true"):
        list(iter_generation_pairs(no_pairs, "val"))


def test_token_dir_does_not_depend_on_the_number_of_processes(data_env, tmp_path):  # noqa: F811
    d, _, _ = data_env  # made with one tokenizer process (this one) and data.pretokenize_workers=1
    two = replace(d, token_dir=str(tmp_path / "two"))
    # the multi-GPU layout on the CPU: two spawned tokenizer processes, two workers each
    pretokenize(two, workers=2, progress=False, devices=["cpu", "cpu"])
    for split in ("train", "val"):
        assert tree(Path(two.token_dir) / split) == tree(Path(d.token_dir) / split)
