"""`unidiff tokenizer train` on a small shapes sample: the SigLIP loss falls, the written dir is the released layout
(loads with the tokenizer loader, pretokenize runs on it), a resume from a periodic checkpoint continues exactly,
and 2 gloo ranks agree with 1 process on the same global batch."""
from __future__ import annotations

import json

import pytest
import torch

from data_pipeline.image_tokenizer.load import build_image_tokenizer, load_image_tokenizer
from tests.dist_helpers import run_distributed
from training.config import load_config
from training.config_errors import ConfigError
from training.decoder import checkpoint
from training.tracking import read_metrics

TINY = ["data.sample.train_scenes=160", "data.sample.val_scenes=30", "data.sample.train_docs=16",
        "data.sample.val_docs=4", "data.sample.shards_per_split=2", "data.image_tokenizer.kmeans_iters=4",
        "data.image_tokenizer.num_embeddings=64", "tokenizer_train.kmeans_images=100", "tokenizer_train.log_every=1",
        "tokenizer_train.batch_size=16", "tokenizer_train.text_width=32", "tokenizer_train.text_heads=2",
        "tokenizer_train.embed_dim=32", "tokenizer_train.warmup_steps=2", "tokenizer_train.dead_code_after=2",
        "tracking.wandb=disabled", "data.pretokenize_workers=1"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    from data_pipeline.sample import make_sample

    base = tmp_path_factory.mktemp("tok")
    cfg = load_config(None, TINY + [f"data.raw_dir={base / 'raw'}"])
    make_sample(cfg.data.raw_dir, cfg.data.sample, progress=False)
    return base / "raw"


def _cfg(raw, tmp, name: str, *extra: str):
    return load_config(None, TINY + [f"data.raw_dir={raw}", f"run.dir={tmp / 'runs'}", f"run.name={name}",
                                     f"data.image_tokenizer.path={tmp / name / 'image_tokenizer'}",
                                     f"data.token_dir={tmp / name / 'tokens'}", *extra])


def _train(cfg):
    from training.tokenizer.train import train_tokenizer

    return train_tokenizer(cfg, progress=False)


@pytest.mark.unit
def test_siglip_loss_falls_and_the_dir_tokenizes(raw, tmp_path):
    from data_pipeline.pretokenize import pretokenize

    cfg = _cfg(raw, tmp_path, "learn", "tokenizer_train.siglip_steps=40", "tokenizer_train.vq_steps=6",
               "tokenizer_train.lr=2e-3")
    report = _train(cfg)
    rows = read_metrics(cfg.run_dir / "tokenizer")
    siglip = [r["tokenizer/siglip_loss"] for r in rows if "tokenizer/siglip_loss" in r]
    assert len(siglip) == 40
    # the SigLIP start (t=10, b=-10) is ~log(2) per positive + 15 negatives near 0: the loss must leave it
    assert sum(siglip[-5:]) / 5 < 0.8 * sum(siglip[:5]) / 5, siglip
    vq = [r["tokenizer/vq_loss"] for r in rows if "tokenizer/vq_loss" in r]
    assert len(vq) == 6 and vq[-1] < vq[0]
    # the released layout, read back by the one loader, encodes; pretokenize runs on it unchanged
    out = cfg.data.image_tokenizer.path
    tok = load_image_tokenizer(out)
    assert tok.codebook_size == 64 and report["fit_usage"]["codebook_size"] == 64
    ids = tok.encode(torch.zeros(1, 3, 64, 64))
    assert ids.shape == (1, 8, 8) and int(ids.max()) < 64
    saved = json.loads((tmp_path / "learn" / "image_tokenizer" / "codebook_report.json").read_text())
    assert {"probe_shape_kind", "val_usage", "train"} <= set(saved)
    manifest = pretokenize(cfg.data, progress=False)["manifest"]
    assert manifest["fingerprint"]["image"] == tok.fingerprint
    assert manifest["splits"]["train"]["ok"] > 0


def _final_state(cfg) -> dict:
    step, state = checkpoint.load_latest(cfg.run_dir / "tokenizer" / "checkpoints")
    assert step == cfg.tokenizer_train.siglip_steps + cfg.tokenizer_train.vq_steps
    return {f"{part}.{k}": v for part in ("tokenizer", "text", "head", "vq") for k, v in state[part].items()}


@pytest.mark.unit
def test_resume_from_a_periodic_checkpoint_is_exact(raw, tmp_path):
    # 4 SigLIP + 4 VQ steps (k-means at step 4, restarts after 2 unused steps); the stop lands on a periodic save
    steps = ["tokenizer_train.siglip_steps=4", "tokenizer_train.vq_steps=4", "tokenizer_train.save_every=3"]
    whole = _cfg(raw, tmp_path, "whole", *steps)
    _train(whole)
    part = _cfg(raw, tmp_path, "part", *steps, "tokenizer_train.stop_after=3")
    assert _train(part) == {}  # stopped: nothing written yet
    assert not (tmp_path / "part" / "image_tokenizer").exists()
    resumed = _cfg(raw, tmp_path, "part", *steps)
    assert _train(resumed)["train"]["resumed_from"] == 3
    a, b = _final_state(whole), _final_state(resumed)
    start = build_image_tokenizer(whole.data.image_tokenizer).state_dict()  # the seeded start: the run moved off it
    assert not torch.equal(a["tokenizer.visual.patch_embed.proj.weight"], start["visual.patch_embed.proj.weight"])
    assert not torch.equal(a["tokenizer.vqmodel.quantize.embedding.weight"], start["vqmodel.quantize.embedding.weight"])
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _dist_worker(rank, world, raw, tmp, name):
    from pathlib import Path

    _train(_cfg(raw, Path(tmp), name, "tokenizer_train.siglip_steps=3", "tokenizer_train.vq_steps=3"))


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_gloo_ranks_agree_with_one_process(raw, tmp_path):
    run_distributed(_dist_worker, 2, raw, str(tmp_path), "two", timeout=240)
    one = _cfg(raw, tmp_path, "one", "tokenizer_train.siglip_steps=3", "tokenizer_train.vq_steps=3")
    _train(one)
    a, b = _final_state(one), _final_state(_cfg(raw, tmp_path, "two", "tokenizer_train.siglip_steps=3",
                                                "tokenizer_train.vq_steps=3"))
    start = build_image_tokenizer(one.data.image_tokenizer).state_dict()
    assert not torch.equal(a["tokenizer.visual.blocks.0.attn.qkv.weight"], start["visual.blocks.0.attn.qkv.weight"])
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-5, rtol=1e-4), k


@pytest.mark.unit
def test_bad_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer_train.text_width"):
        load_config(None, ["tokenizer_train.text_width=30", "tokenizer_train.text_heads=4"])
    with pytest.raises(ConfigError, match="tokenizer_train.init_from"):
        load_config(None, [f"tokenizer_train.init_from={tmp_path / 'nothing'}"])
