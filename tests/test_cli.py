"""The `unidiff` entry point: real subprocesses, real exit codes and messages."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def unidiff(*words, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, words)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_model_info_json_for_the_release_config():
    r = unidiff("model", "info", "configs/model/llada2_mini.yaml", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert abs(info["total_params"] - 16.26e9) / 16.26e9 < 0.01
    assert 1.4e9 <= info["active_params"] <= 1.6e9


def test_bad_config_exits_2_naming_the_key():
    r = unidiff("model", "info", "configs/model/tiny.yaml", "model.num_experts=12", "parallel.expert=8")
    assert r.returncode == 2
    assert "model.num_experts=12 is not allowed: must be divisible by parallel.expert=8" in r.stderr


def test_hf_import_writes_a_preset_that_builds_the_same_model(tmp_path, tiny_cfg):
    from training.config import load_config
    from training.hf_format import export_hf
    from training.model import build_model

    model = build_model(tiny_cfg.model, seed=1)
    export_hf(model.state_dict(), tiny_cfg.model, tmp_path / "hf", dtype=torch.float32)
    r = unidiff("convert", "hf-import", "--src", tmp_path / "hf", "--out", tmp_path / "imported.yaml")
    assert r.returncode == 0, r.stderr
    cfg = load_config(tmp_path / "imported.yaml")
    assert cfg.model == tiny_cfg.model
    # A weight that does not fit its config.json is reported with its name.
    hf = json.loads((tmp_path / "hf/config.json").read_text())
    hf["hidden_size"] = 32
    (tmp_path / "hf/config.json").write_text(json.dumps(hf))
    r = unidiff("convert", "hf-import", "--src", tmp_path / "hf", "--out", tmp_path / "bad.yaml")
    assert r.returncode == 2 and "does not match config.json" in r.stderr


@pytest.mark.parametrize("words, named", [
    (["model", "info", "configs/model/tiny.yaml", "stray"], "stray"),
    (["model", "info", "stray", "configs/model/tiny.yaml", "model.num_hidden_layers=3"], "stray"),
    (["model", "info", "configs/model/tiny.yaml", "configs/model/llada2_mini.yaml"], "configs/model/llada2_mini.yaml"),
    (["data", "make-sample", "configs/model/tiny.yaml", "{tmp}/out", "extra"], "extra"),
])
def test_stray_words_and_a_second_config_are_errors_naming_them(words, named, tmp_path, capsys):
    from launch.cli import main

    with pytest.raises(SystemExit) as e:
        main([w.format(tmp=tmp_path) for w in words])
    err = capsys.readouterr().err
    assert e.value.code == 2 and named in err, err
