"""`unidiff generate` end to end on files written here: sample tokenizer, random image tokenizer, a tiny model
exported in HF format; understanding, text-to-image and editing run from the checkpoint; the inference room's
backbone loader on each kind of source."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import skimage

from training.config import load_config
from launch.commands import cmd_generate
from training.model import build_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from data_pipeline.image_tokenizer.load import build_image_tokenizer, save_image_tokenizer
    from data_pipeline.text_tokenizer import build_sample_tokenizer
    from training.hf_format import export_hf

    root = tmp_path_factory.mktemp("gen")
    texts = ["a red circle above a blue square", "what is in the image?", "make the sky green"] * 20
    build_sample_tokenizer(texts, root / "tokenizer.json", vocab_size=2048)
    cfg = load_config("configs/model/tiny.yaml", [f"data.text_tokenizer={root / 'tokenizer.json'}",
                                                  f"data.image_tokenizer.path={root / 'itok'}",
                                                  f"run.dir={root / 'runs'}", "diffusion.sample_gen_length=24",
                                                  "diffusion.sample_block_length=8", "diffusion.sample_steps=4",
                                                  "diffusion.sample_image_steps=2"])
    save_image_tokenizer(build_image_tokenizer(cfg.data.image_tokenizer), root / "itok")
    model = build_model(cfg.model, seed=0)
    export_hf(model.state_dict(), cfg.model, root / "hf")
    return cfg, root


def _args(root, **kw):
    base = dict(task="t2i", prompt="a red circle", image="", grid="3x4", checkpoint=str(root / "hf"),
                out=str(root / "out"), samples=2, seed=0, device="cpu", decoder="")
    base.update(kw)
    return argparse.Namespace(**base)


def test_generate_text_to_image_and_editing(files):
    cfg, root = files
    assert cmd_generate(cfg, _args(root)) == 0
    codes = np.load(root / "out" / "codes.npy")
    assert codes.shape == (2, 3, 4) and codes.min() >= 0 and codes.max() < 256
    photo = str(Path(skimage.__file__).parent / "data" / "astronaut.png")
    assert cmd_generate(cfg, _args(root, task="edit", image=photo, prompt="make the sky green", samples=1,
                                   out=str(root / "edit"))) == 0
    edited = json.loads((root / "edit" / "codes.json").read_text())
    assert np.asarray(edited["codes"]).shape[0] == 1 and edited["nfe"] > 0


def test_generate_understanding(files, capsys):
    cfg, root = files
    photo = str(Path(skimage.__file__).parent / "data" / "astronaut.png")
    assert cmd_generate(cfg, _args(root, task="understand", image=photo, prompt="what is in the image?",
                                   out=str(root / "und"))) == 0
    ans = json.loads((root / "und" / "answer.json").read_text())
    assert ans["tokens"] <= 24 and ans["nfe"] >= 1 and "generate understand" in capsys.readouterr().out


def test_without_checkpoint_it_loads_the_latest_of_the_run_dir(files):
    """No --checkpoint: the run's own <run_dir>/checkpoints/latest, as the trainer's CheckpointManager saved it."""
    import torch

    from training.checkpoint import CheckpointManager
    from training.engines.native import NativeEngine
    from training.inference.backbone import load_backbone

    cfg, _ = files
    engine = NativeEngine(cfg)
    saved = CheckpointManager(cfg.run_dir).save(engine, 1, {})
    assert saved.parent == cfg.run_dir / "checkpoints"
    model, source = load_backbone(cfg, None, "cpu")
    assert source == str(saved)
    want = engine.full_state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], msg=k)


def test_t2i_with_a_decoder_writes_the_images(files, tmp_path):
    """--decoder DIR: the token grids go through the decoder (training.decoder.decode_tokens) to PNG files."""
    import torch
    from PIL import Image

    from training.decoder import checkpoint
    from training.decoder.config import DecoderConfig
    from training.decoder.decode import decoder_meta
    from training.decoder.sigvq import TokenDecoder

    cfg, root = files
    torch.manual_seed(0)
    dec = TokenDecoder(DecoderConfig(image_size=16, token_grid=2, patch_size=4, dim=32, n_heads=2, axes_dims=[4, 6, 6],
                                     n_layers=1, cap_feat_dim=16, t_mid_dim=32, codebook_size=256))
    checkpoint.save(tmp_path / "dec", 1, {"model": dec.state_dict(), "meta": decoder_meta(dec.cfg, "turbo", 2)})
    assert cmd_generate(cfg, _args(root, grid="2x2", out=str(tmp_path / "out"), decoder=str(tmp_path / "dec"))) == 0
    pngs = sorted((tmp_path / "out").glob("image_*.png"))
    assert [p.name for p in pngs] == ["image_0.png", "image_1.png"]
    assert Image.open(pngs[0]).size == (16, 16)


def test_backbone_loader_sources_and_dtypes(files, tmp_path):
    """HF dir and checkpoint dir load the same weights; fp32 on the CPU by default, bf16 on request (the default on
    CUDA) with the router bias kept fp32; a missing dir is an error naming it."""
    import torch

    from training import accelerator
    from training.checkpoint import CheckpointManager
    from training.config_errors import ConfigError
    from training.engines.native import NativeEngine
    from training.inference.backbone import load_backbone

    cfg, root = files
    assert accelerator.inference_dtype("cuda:0") == torch.bfloat16
    assert accelerator.inference_dtype("cpu") == torch.float32
    hf, where = load_backbone(cfg, root / "hf", "cpu")
    assert where == str(root / "hf") and {p.dtype for p in hf.parameters()} == {torch.float32}
    engine = NativeEngine(cfg)
    engine.load_full_state_dict(hf.state_dict())
    step_dir = CheckpointManager(tmp_path).save(engine, 1, {})
    for source in (root / "hf", step_dir):
        half, _ = load_backbone(cfg, source, "cpu", dtype=torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
        assert all(m.gate.expert_bias.dtype == torch.float32 for m in half.moe_layers())
        for k, v in half.state_dict().items():
            torch.testing.assert_close(v, hf.state_dict()[k].to(v.dtype), msg=k)
    with pytest.raises(ConfigError, match="does-not-exist"):
        load_backbone(cfg, tmp_path / "does-not-exist", "cpu")
