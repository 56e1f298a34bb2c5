"""model.lora in one process: the adapted model starts as the base, only adapters train (grads, AdamW state), the
merged HF export computes base + adapter logits, and the adapters alone load over the base HF dir. The TP / EP
layouts against this single-process reference: tests/test_engines_parity.py::test_lora_matches_single_process."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import ROOT
from tests.engine_cases import make_cfg, run_engine_steps

pytestmark = pytest.mark.unit

LORA = ("model.lora.rank=4", "model.lora.alpha=8")


def _engine(extra=LORA):
    from training.engines import build_engine
    return build_engine(make_cfg(extra=extra))


def _logits(model, seed=0):
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_starts_as_the_base_and_trains_only_the_adapters():
    from training.model import build_model
    from training.model.lora import is_adapter
    eng = _engine()
    model = eng.unwrap()
    base = build_model(eng.cfg.model, "cpu", seed=eng.cfg.train.seed)
    assert torch.equal(_logits(model), _logits(base))  # B = 0
    adapters = {n: p for n, p in model.named_parameters() if is_adapter(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapters)
    stepped = sum(p.numel() for g in eng.optimizer.param_groups for p in g["params"])
    assert stepped == sum(p.numel() for p in adapters.values())
    run_engine_steps(eng, eng.cfg, steps=1)
    assert len(eng.optimizer.state) == len(adapters)  # AdamW moments for the adapters only
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert all(p.grad is None for n, p in model.named_parameters() if not is_adapter(n))
    assert all(adapters[n].abs().max() > 0 for n in adapters if n.endswith("lora_B"))


def test_lora_targets_and_layout_are_checked():
    from training.config import ConfigError
    with pytest.raises(ConfigError, match="model.lora.targets"):
        make_cfg(extra=("model.lora.rank=4", "model.lora.targets=[attention_qkv,lm_head]"))
    with pytest.raises(ConfigError, match="parallel.expert_tensor=2 is not allowed: must be 1 with model.lora"):
        make_cfg(etp=2, extra=LORA)
    make_cfg(etp=2, extra=(*LORA, "model.lora.targets=[attention_qkv,shared_expert]"))  # no expert adapters: fine
    only_qkv = _engine((*LORA, "model.lora.targets=[attention_qkv]"))
    assert sorted(n for n, p in only_qkv.unwrap().named_parameters() if p.requires_grad)[:2] == [
        "model.layers.0.attention.query_key_value.lora_A", "model.layers.0.attention.query_key_value.lora_B"]
    assert sum(p.requires_grad for p in only_qkv.unwrap().parameters()) == 2 * 3


def test_merged_export_and_adapter_dir_give_base_plus_adapter_logits(tmp_path):
    """A LoRA checkpoint with B != 0: `convert hf-export --merge-lora` writes plain HF weights whose logits are the
    adapted model's; `convert lora-export` writes the adapters alone (small), which load over the base HF dir."""
    from launch.cli import main
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    from training.hf_format import export_hf, import_hf
    from training.model import build_model
    eng = _engine()
    run_engine_steps(eng, eng.cfg, steps=1)  # the checkpoint holds AdamW moments too
    with torch.no_grad():
        for n, p in eng.unwrap().named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    want = _logits(eng.unwrap())
    assert not torch.allclose(want, _logits(build_model(eng.cfg.model, "cpu", seed=eng.cfg.train.seed)), atol=1e-3)
    ckpt = CheckpointManager(tmp_path / "run").save(eng, 1, {})
    words = ["configs/model/tiny.yaml", *LORA, "--checkpoint", str(ckpt), "--dtype", "float32"]

    assert main(["convert", "hf-export", *words, "--out", str(tmp_path / "plain")]) == 2  # adapters need the flag
    assert main(["convert", "hf-export", *words, "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    cfg, merged = import_hf(tmp_path / "merged")
    assert "lora" not in json.loads((tmp_path / "merged/config.json").read_text())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (_logits(merged) - want).abs().max() < 1e-5

    assert main(["convert", "lora-export", *words[:-2], "--out", str(tmp_path / "adapters")]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapters/adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == {n for n, p in eng.unwrap().named_parameters() if p.requires_grad}
    size = (tmp_path / "adapters/adapter_model.safetensors").stat().st_size
    assert size < 0.2 * sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors"))
    export_hf(build_model(eng.cfg.model, "cpu", seed=eng.cfg.train.seed).state_dict(), eng.cfg.model,
              tmp_path / "base", dtype=torch.float32)
    over = build_engine(make_cfg(extra=(*LORA, f"train.init_from={tmp_path / 'base'}",
                                        f"model.lora.init_from={tmp_path / 'adapters'}", "train.seed=3")))
    over.load_hf(over.cfg.train.init_from)  # (a different seed: every weight comes from the two dirs)
    assert torch.equal(_logits(over.unwrap()), want)
    wrong = make_cfg(extra=("model.lora.rank=8", f"train.init_from={tmp_path / 'base'}",
                            f"model.lora.init_from={tmp_path / 'adapters'}"))
    from training.config import ConfigError
    with pytest.raises(ConfigError, match="model.lora.rank=8 but the adapters have 4"):
        build_engine(wrong).load_hf(wrong.train.init_from)


def test_bf16_keeps_the_frozen_base_in_bf16_only():
    """train.precision=bf16: every module weight is bf16; only the adapters get fp32 masters (engines/master.py), so
    the frozen base costs 2 bytes a parameter and nothing else."""
    from training.engines import build_engine
    from training.model.lora import is_adapter
    eng = build_engine(make_cfg(precision="bf16", extra=LORA))
    named = dict(eng.unwrap().named_parameters())
    assert {p.dtype for p in named.values()} == {torch.bfloat16}
    assert {id(p) for p in eng.master.of} == {id(p) for n, p in named.items() if is_adapter(n)}
    assert {m.dtype for m in eng.master.of.values()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in named.items()}
    run_engine_steps(eng, eng.cfg, steps=1)
    assert all(torch.equal(named[n], before[n]) for n in named if not is_adapter(n))
    assert any(not torch.equal(named[n], before[n]) for n in named if n.endswith("lora_B"))
