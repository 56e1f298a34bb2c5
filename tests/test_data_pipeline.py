"""Raw -> tokens -> decode round trip, the official layout, quarantine, manifest, kill-and-rerun of pretokenize."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import layout, shapes
from data_pipeline.config import DataConfig
from data_pipeline.formats import iter_tar_samples, parse_sample, write_tar, ImageLimits
from data_pipeline.image_tokenizer.fit_codebook import fit_codebook
from data_pipeline.image_tokenizer.load import load_image_tokenizer
from data_pipeline.image_tokenizer.preprocess import (generate_crop_size_list, resize_for_understanding,
                                                      to_pixel_values, var_center_crop)
from data_pipeline.manifest import load_manifest
from data_pipeline.pretokenize import pretokenize
from data_pipeline.sample import make_sample
from data_pipeline.text_tokenizer import load_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(base: Path) -> DataConfig:
    d = DataConfig(raw_dir=str(base / "raw"), token_dir=str(base / "tokens"))
    d.sample.train_scenes, d.sample.val_scenes, d.sample.train_docs, d.sample.val_docs = 240, 40, 24, 6
    d.sample.shards_per_split = 3
    d.image_tokenizer.path = str(base / "image_tokenizer")
    d.image_tokenizer.kmeans_iters = 8
    d.pretokenize_workers = 1
    d.pad_to_block = True  # the loader tests pass a block size and check the alignment
    return d


@pytest.fixture(scope="session")
def data_env(tmp_path_factory):
    """make-sample -> fit-codebook -> pretokenize on a small sample, shared by the data tests."""
    base = tmp_path_factory.mktemp("data")
    d = small_cfg(base)
    make_sample(d.raw_dir, d.sample, progress=False)
    report = fit_codebook(d, progress=False)
    result = pretokenize(d, progress=False)
    return d, report, result


def read_token_samples(tar: Path):
    for key, m, err in iter_tar_samples(tar):
        assert err is None
        yield key, np.load(io.BytesIO(m["ids.npy"])), np.load(io.BytesIO(m["maskable.npy"])), \
            np.load(io.BytesIO(m["modality.npy"])), json.loads(m["json"])


def raw_by_key(raw_dir: Path, split: str) -> dict:
    out = {}
    for tar in sorted((raw_dir / split).glob("*.tar")):
        for key, m, err in iter_tar_samples(tar):
            out[key] = parse_sample(key, m, ImageLimits())
    return out


def test_multi_turn_vqa_samples_ask_only_what_the_image_answers():
    """data.sample.vqa_turns > 1: each train scene's VQA sample is a conversation whose first turn is the
    single-turn sample's question; every answer is the answer key's, and none is given away by an earlier turn."""
    import re
    from data_pipeline.config import SampleConfig
    from data_pipeline.sample import make_split

    def convs(turns):
        cfg = SampleConfig(train_scenes=300, train_docs=0, vqa_turns=turns)
        return {int(k.rsplit("-", 1)[1]): parse_sample(k, m, ImageLimits())
                for k, m in make_split("train", cfg, [])[0] if "-vqa-" in k}

    one, four = convs(1), convs(4)
    assert all(len(a.turns) == 1 for a in one.values()) and sum(len(b.turns) for b in four.values()) > 3 * len(four)
    for i, b in four.items():
        assert b.turns[0] == one[i].turns[0]
        key = {(q.question, q.answer) for q in shapes.questions(shapes.scene_for(0, "train", i))}
        said = ""
        for k, (q, ans) in enumerate(b.turns):
            assert (q, ans) in key
            if ans in ("yes", "no"):
                assert all(sorted(q.rstrip("?").split()) != sorted(p.rstrip("?").split()) for p, _ in b.turns[:k])
            else:
                assert not re.search(rf"\b{re.escape(ans)}\b", said), (b.turns, k)
            said += f" {q} {ans}"


@pytest.mark.e2e
def test_round_trip_text_and_image_grid(data_env):
    d, _, _ = data_env
    tok = load_text_tokenizer(Path(d.raw_dir) / "tokenizer.json")
    sp = layout.SpecialTokens.from_tokenizer(tok)
    itok = load_image_tokenizer(d.image_tokenizer.path)
    icfg = d.image_tokenizer
    man = load_manifest(d.token_dir)
    off = man["vocab"]["image_token_offset"]
    raw = raw_by_key(Path(d.raw_dir), "val")
    seen = set()
    for key, ids, msk, mod, info in read_token_samples(Path(d.token_dir) / "val" / "val-000000.tar"):
        src = raw[info["meta"]["source_key"]]
        segs = layout.decode_sequence(ids, tok, sp, off)
        assert (mod == (ids >= off)).all()
        if info["task"] == "interleaved":
            texts = [s[1] for s in segs if s[0] == "text"]
            grids = [s[1] for s in segs if s[0] == "image"]
            assert "".join(texts) == "".join(src.texts) + layout.EOS
            imgs = [to_pixel_values(resize_for_understanding(im, icfg.resize_factor, icfg.min_pixels,
                                                             icfg.max_pixels)) for im in src.images]
            for g, px in zip(grids, imgs, strict=True):
                assert np.array_equal(g, itok.encode(px[None])[0].numpy())
            assert msk.all()
        elif info["task"] in ("caption", "vqa"):
            ans = tok.decode(ids[msk])
            want = src.texts[0] if info["task"] == "caption" else src.turns[0][1]
            assert ans == want + layout.EOS
            (grid,) = [s[1] for s in segs if s[0] == "image"]
            px = to_pixel_values(resize_for_understanding(src.images[0], icfg.resize_factor, icfg.min_pixels,
                                                          icfg.max_pixels))
            assert np.array_equal(grid, itok.encode(px[None])[0].numpy())
        else:  # t2i: header in the prompt, ids + <|/image|> + EOS maskable
            px = to_pixel_values(var_center_crop(src.images[0], generate_crop_size_list(
                icfg.gen_max_patches, icfg.resize_factor), scale=True))
            want = itok.encode(px[None])[0]
            gh, gw = want.shape
            cap = layout.UNCONDITION if info["meta"]["uncondition"] else src.texts[0]
            prompt = tok.decode(ids[:info["prompt_len"]])
            assert prompt == (f"<role>SYSTEM</role> {layout.SYSTEM_T2I} <role>HUMAN</role>{cap}"
                              f"<role>ASSISTANT</role><|image|><|reserved_token_{gh}|><|reserved_token_{gw}|><boi>")
            body = ids[info["prompt_len"]:]
            assert np.array_equal(body[:-2] - off, want.flatten().numpy())
            assert body[-2:].tolist() == [sp.image_end, sp.eos]
            assert msk[info["prompt_len"]:].all() and not msk[:info["prompt_len"]].any()
        seen.add(info["task"])
    assert seen == {"caption", "vqa", "t2i", "interleaved"}


@pytest.mark.unit
def test_special_tokens_resolve_by_name_at_released_ids():
    """A tokenizer with the official strings at the release's ids must give exactly those ids."""
    from tokenizers import Tokenizer, models
    official = {"<|endoftext|>": 156892, "<|mask|>": 156895, "<|image|>": 156901, "<|/image|>": 156902,
                "<boi>": 156904, "<uncondition>": 156906, "<role>": 156897, "</role>": 156898}
    vocab = {"[UNK]": 0, "a": 1, **official, **{f"<|reserved_token_{n}|>": 157000 + n for n in range(70)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    sp = layout.SpecialTokens.from_tokenizer(tok)
    assert (sp.mask, sp.eos, sp.pad, sp.image_start, sp.image_end, sp.boi) == (156895, 156892, 156892, 156901,
                                                                               156902, 156904)
    assert sp.grid(64) == 157064 and sp.grid_side(157032) == 32 and sp.max_grid == 69
    with pytest.raises(ValueError, match="reserved_token_70"):
        sp.grid(70)
    block = layout.image_block(np.arange(6).reshape(2, 3), 2, 3, sp, 157184)
    assert block == [156901, 157002, 157003, 156904, *range(157184, 157190), 156902]
    del vocab["<boi>"]
    with pytest.raises(ValueError, match="<boi>"):
        layout.SpecialTokens.from_tokenizer(Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")))


@pytest.mark.e2e
def test_manifest_reconciles_and_codebook_report(data_env):
    d, report, _ = data_env
    man = load_manifest(d.token_dir)
    for split, s in man["splits"].items():
        assert s["inputs"] == s["ok"] + s["quarantined"]
        assert s["token_samples"] == sum(s["tasks"].values())
        assert sum(sh["inputs"] for sh in s["shards"]) == s["inputs"]
    tok = load_text_tokenizer(Path(d.raw_dir) / "tokenizer.json")
    assert man["vocab"] == {"image_token_offset": 2048, "vocab_size": 2048 + 256, "codebook_size": 256,
                            "text_vocab_size": tok.vocab_size}
    assert report["flat_colour_codes_disjoint"]
    assert report["fit_usage"]["dead"] == 0
    assert report["val_usage"]["perplexity"] > 50


def _png(img):
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


@pytest.mark.e2e
def test_bad_input_is_quarantined_with_reasons(data_env, tmp_path):
    d0, _, _ = data_env
    good = _png(shapes.render(shapes.scene_for(0, "x", 0)))
    conv = json.dumps({"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]}).encode()
    cases = {
        "corruptbytes": ({"png": b"this is not an image", "txt": b"a cap"}, "corrupt_image"),
        "truncimage": ({"png": good[:len(good) // 2], "txt": b"a cap"}, "corrupt_image"),
        "zerosize": ({"png": b"", "txt": b"a cap"}, "zero_size_image"),
        "aspect": ({"png": _png(Image.new("RGB", (400, 4))), "txt": b"wide"}, "absurd_aspect"),
        "huge": ({"png": _png(Image.new("RGB", (300, 300))), "txt": b"big"}, "too_many_pixels"),
        "emptytext": ({"png": good, "txt": b"   "}, "empty_text"),
        "emptyanswer": ({"png": good, "json": json.dumps({"conversations": [
            {"from": "human", "value": "q?"}, {"from": "gpt", "value": ""}]}).encode()}, "empty_text"),
        "badjson": ({"png": good, "json": b"{not json"}, "bad_json"),
        "missingkey": ({"png": good, "json": b"{\"other\": 1}"}, "missing_key"),
        "wrongtype": ({"json": json.dumps({"texts": "abc", "images": []}).encode()}, "wrong_type"),
        "wrongtype2": ({"png": good, "json": json.dumps({"conversations": [{"from": "human", "value": 3}]}).encode()},
                       "wrong_type"),
        "missingimage": ({"json": json.dumps({"texts": ["hi", None], "images": [None, "0.png"]}).encode()},
                         "missing_image"),
        "ok1": ({"png": good, "txt": b"a good caption"}, None),
        "ok2": ({"png": good, "json": conv}, None),
    }
    d = small_cfg(tmp_path)
    d.image_tokenizer.path = d0.image_tokenizer.path
    d.text_tokenizer = str(Path(d0.raw_dir) / "tokenizer.json")
    d.max_input_pixels = 256 * 256
    (tmp_path / "raw" / "train").mkdir(parents=True)
    write_tar(tmp_path / "raw/train/bad-000000.tar", [(k, m) for k, (m, _) in cases.items()])
    # A truncated tar: 6 good samples, cut inside the 4th sample's image.
    full = tmp_path / "full.tar"
    write_tar(full, [(f"t{i}", {"png": good, "txt": b"caption"}) for i in range(6)])
    data = full.read_bytes()
    cut = data.find(b"t3.png") + 700
    (tmp_path / "raw/train/trunc-000000.tar").write_bytes(data[:cut])
    man = pretokenize(d, progress=False)["manifest"]
    s = man["splits"]["train"]
    got = {q["key"]: q["reason"] for q in s["quarantine"]}
    for k, (_, reason) in cases.items():
        assert got.get(k) == reason, (k, got.get(k), reason)
    assert got["t3"] == "truncated_tar"
    assert s["inputs"] == len(cases) + 4 and s["ok"] == 2 + 3
    assert s["inputs"] == s["ok"] + s["quarantined"]
    assert sum(s["quarantine_reasons"].values()) == s["quarantined"]


KILL_SCRIPT = """
import sys
from data_pipeline.config import DataConfig
from data_pipeline.pretokenize import pretokenize
d = DataConfig(raw_dir=sys.argv[1], token_dir=sys.argv[2], text_tokenizer=sys.argv[3])
d.image_tokenizer.path = sys.argv[4]
pretokenize(d, workers=1, progress=False)
"""


@pytest.mark.e2e
def test_killed_pretokenize_rerun_is_byte_identical(data_env, tmp_path):
    d0, _, _ = data_env
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    # 8 shards re-cut from the sample so a kill lands between shards
    samples = [s for tar in sorted((Path(d0.raw_dir) / "train").glob("*.tar")) for s in iter_tar_samples(tar)]
    for i in range(8):
        write_tar(raw / "train" / f"train-{i:06d}.tar", [(k, m) for k, m, _ in samples[i::8]][:60])
    args = lambda out: [sys.executable, "-c", KILL_SCRIPT, str(raw), str(out),  # noqa: E731
                        str(Path(d0.raw_dir) / "tokenizer.json"), d0.image_tokenizer.path]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(args(clean), check=True, env=env, capture_output=True)
    p = subprocess.Popen(args(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "train").glob("*.index.json")):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_done = len(list((killed / "train").glob("*.index.json")))
    assert 1 <= n_done < 8, f"kill landed after {n_done} of 8 shards"
    out = subprocess.run(args(killed), check=True, env=env, capture_output=True, text=True).stdout
    assert f"{n_done} skipped" in out
    for f in sorted((clean / "train").iterdir()):
        assert f.read_bytes() == (killed / "train" / f.name).read_bytes(), f.name
    assert not list((killed / "train").glob("*.tmp"))
    assert (clean / "manifest.json").read_bytes() == (killed / "manifest.json").read_bytes()


@pytest.mark.e2e
def test_resume_from_a_periodic_checkpoint_on_token_shards_is_exact(data_env, tmp_path):
    """A job that dies without warning falls back to its last periodic checkpoint: the steps after it must equal the
    uninterrupted run's, on real token shards (the loader's DataLoader once drew its base seed from the global RNG
    the trainer restores, so every mask after a resume was one draw off)."""
    from training.config import load_config
    from training.tracking import read_metrics
    from training.trainer import train

    d, _, _ = data_env
    words = [f"data.raw_dir={d.raw_dir}", f"data.token_dir={d.token_dir}", "train.seq_len=128", "train.steps=7",
             "train.save_every=3", "train.keep_last=5", "train.micro_batch_size=2", "train.global_batch_size=2",
             "train.warmup_steps=2", "train.decay_steps=2", "train.precision=fp32", "tracking.wandb=disabled",
             f"run.dir={tmp_path}"]
    train(load_config(ROOT / "configs/model/tiny.yaml", [*words, "run.name=whole"]))
    ckpts = tmp_path / "resumed" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_000003", ckpts / "step_000003")
    (ckpts / "latest").write_text("step_000003\n")
    train(load_config(ROOT / "configs/model/tiny.yaml", [*words, "run.name=resumed"]))
    whole = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "whole")}
    resumed = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "resumed")}
    assert sorted(resumed) == [3, 4, 5, 6]
    assert resumed == {s: whole[s] for s in resumed}  # exact, from the first step after the resume
