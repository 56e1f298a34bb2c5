"""The typed config: presets merge, overrides apply, bad values fail early with the key named."""
from __future__ import annotations

import pytest

from tests.conftest import ROOT
from training.config import ConfigError, load_config, save_config

pytestmark = pytest.mark.unit
TINY = ROOT / "configs/model/tiny.yaml"


def test_preset_and_overrides_merge_over_the_schema(tmp_path):
    cfg = load_config(TINY, ["model.num_hidden_layers=5", "train.lr=0.01", "parallel.expert=2"])
    assert cfg.model.num_hidden_layers == 5 and cfg.train.lr == 0.01 and cfg.parallel.expert == 2
    assert cfg.model.hidden_size == 64  # from the preset
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("overrides,message", [
    (["model.num_experts=6", "model.n_group=2", "model.topk_group=1", "parallel.expert=4"],
     "model.num_experts=6 is not allowed: must be divisible by parallel.expert=4"),
    (["parallel.tensor=3"], "model.num_attention_heads=4 is not allowed: must be divisible by parallel.tensor=3"),
    (["model.num_key_value_heads=3"], "model.num_attention_heads=4 is not allowed: must be a multiple of"),
    (["model.nmu_experts=4"], "unknown key 'model.nmu_experts'"),
    (["train.engine=jax"], "train.engine=jax is not allowed: must be native | megatron | deepspeed"),
    (["model.topk_group=9"], "model.topk_group=9 is not allowed"),
    (["train.global_batch_size=5", "train.micro_batch_size=2"], "train.global_batch_size=5 is not allowed"),
    (["model.hidden_size=abc"], "model.hidden_size"),
    (["nonsense"], "not of the form dotted.key=value"),
])
def test_bad_values_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert message in str(e.value)


def test_unknown_key_in_a_yaml_preset_names_file_and_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "train.stpes" in str(e.value) and "steps" in str(e.value) and str(bad) in str(e.value)


def test_data_parallel_size_from_world_and_layout():
    cfg = load_config(TINY, ["parallel.tensor=2", "parallel.expert=2"])
    assert cfg.parallel.data_parallel(4) == 2
    with pytest.raises(ConfigError, match="not divisible by parallel.tensor"):
        cfg.parallel.data_parallel(3)


# Presets for released weights need the user's local files; standalone they must fail naming that key.
NEEDS_LOCAL_FILES = {"decoder/release.yaml": "decoder.vae_path"}


def test_every_shipped_preset_loads():
    presets = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(presets) > 10
    for p in presets:
        key = NEEDS_LOCAL_FILES.get(str(p.relative_to(ROOT / "configs")))
        if key is None:
            load_config(p)
        else:
            with pytest.raises(ConfigError, match=key):
                load_config(p)


def test_circular_defaults_include_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\ntrain:\n  steps: 3\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    (tmp_path / "self.yaml").write_text("defaults: [self.yaml]\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(e.value) and "b.yaml -> " in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="self.yaml"):
        load_config(tmp_path / "self.yaml")
    # Two presets including one shared base (a diamond) is composition, not a circle.
    (tmp_path / "base.yaml").write_text("train:\n  steps: 7\n")
    (tmp_path / "x.yaml").write_text("defaults: [base.yaml]\n")
    (tmp_path / "y.yaml").write_text("defaults: [base.yaml]\ntrain:\n  lr: 0.5\n")
    (tmp_path / "top.yaml").write_text("defaults: [x.yaml, y.yaml]\n")
    cfg = load_config(tmp_path / "top.yaml")
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5
