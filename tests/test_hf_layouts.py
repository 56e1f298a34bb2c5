"""HF interop in both public layouts: the released per-expert keys (`model_type: llada2_moe`) and dFactory's merged
training layout (`model_type: llada2_moe_veomni`, routed experts stacked on dim 0 without a `.weight` suffix).

The checkpoints here are written straight from the public key/shape list (docs in /work/shared/research/
llada2-weight-layout.md; dFactory scripts/moe_convertor.py stacks per-expert [I, H] / [H, I] weights with
torch.stack(dim=0)), not by our exporter, so import is checked against the layout, not against itself.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import subprocess

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import ROOT
from training.hf_format import config_to_hf, export_hf, import_hf

pytestmark = pytest.mark.unit
PROJ = ("gate_proj", "up_proj", "down_proj")


def public_state(cfg, layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names and shapes of `layout` ("released" | "merged")."""
    g = torch.Generator().manual_seed(seed)
    H, hd, E, I = cfg.hidden_size, cfg.head_dim, cfg.num_experts, cfg.moe_intermediate_size

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    out = {"model.word_embeddings.weight": w(cfg.vocab_size, H), "model.norm.weight": norm(H),
           "lm_head.weight": w(cfg.vocab_size, H)}
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}"
        out.update({
            f"{p}.attention.query_key_value.weight": w((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd, H),
            f"{p}.attention.query_layernorm.weight": norm(hd), f"{p}.attention.key_layernorm.weight": norm(hd),
            f"{p}.attention.dense.weight": w(H, cfg.num_attention_heads * hd),
            f"{p}.input_layernorm.weight": norm(H), f"{p}.post_attention_layernorm.weight": norm(H)})
        if n < cfg.first_k_dense_replace:
            out.update({f"{p}.mlp.gate_proj.weight": w(cfg.intermediate_size, H),
                        f"{p}.mlp.up_proj.weight": w(cfg.intermediate_size, H),
                        f"{p}.mlp.down_proj.weight": w(H, cfg.intermediate_size)})
            continue
        S = I * cfg.num_shared_experts
        out.update({f"{p}.mlp.gate.weight": w(E, H), f"{p}.mlp.gate.expert_bias": 0.1 * torch.randn(E, generator=g),
                    f"{p}.mlp.shared_experts.gate_proj.weight": w(S, H),
                    f"{p}.mlp.shared_experts.up_proj.weight": w(S, H),
                    f"{p}.mlp.shared_experts.down_proj.weight": w(H, S)})
        fused = {"gate_proj": w(E, I, H), "up_proj": w(E, I, H), "down_proj": w(E, H, I)}
        for proj, t in fused.items():
            if layout == "merged":
                out[f"{p}.mlp.experts.{proj}"] = t
            else:
                out.update({f"{p}.mlp.experts.{e}.{proj}.weight": t[e].clone() for e in range(E)})
    return out


def write_public(path, cfg, layout: str, seed: int = 0, shards: int = 1):
    """config.json + `shards` safetensors files (with the index when more than one), as the releases lay them out."""
    state = public_state(cfg, layout, seed)
    path.mkdir(parents=True)
    hf = config_to_hf(cfg, "float32")
    hf["model_type"] = "llada2_moe_veomni" if layout == "merged" else "llada2_moe"
    (path / "config.json").write_text(json.dumps(hf))
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(path / name))
        weight_map.update(dict.fromkeys(part, name))
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def file_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


@pytest.fixture
def cfg(tiny_cfg):
    return dataclasses.replace(tiny_cfg.model, expert_bias_update_rate=0.0)


def test_merged_layout_imports_to_the_same_model_as_per_expert(tmp_path, cfg):
    write_public(tmp_path / "released", cfg, "released", seed=5)
    write_public(tmp_path / "merged", cfg, "merged", seed=5, shards=3)  # experts of one layer split over files
    _, per_expert = import_hf(tmp_path / "released")
    _, merged = import_hf(tmp_path / "merged")
    a, b = per_expert.state_dict(), merged.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(per_expert.eval()(ids).logits, merged.eval()(ids).logits)


def test_merged_layout_with_an_expert_tensor_twice_is_rejected(tmp_path, cfg):
    state = write_public(tmp_path / "mixed", cfg, "merged")
    # a merged file plus one per-expert key of the same layer: expert 3 would be written twice
    save_file({"model.layers.1.mlp.experts.3.gate_proj.weight": state["model.layers.1.mlp.experts.gate_proj"][3]},
              str(tmp_path / "mixed/extra.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.experts.gate_proj.*twice"):
        import_hf(tmp_path / "mixed")


@pytest.mark.parametrize("layout", ["merged", "released"])
def test_export_in_either_layout_writes_the_public_names_and_round_trips(tmp_path, cfg, layout):
    src = write_public(tmp_path / "src", cfg, "merged", seed=2)
    _, model = import_hf(tmp_path / "src")
    out = export_hf(model.state_dict(), cfg, tmp_path / "out", dtype=torch.float32, layout=layout)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == {"merged": "llada2_moe_veomni", "released": "llada2_moe"}[layout]
    want = src if layout == "merged" else public_state(cfg, "released", seed=2)
    got = file_tensors(out)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # bit-exact in fp32, names and orientation as published
    _, again = import_hf(out)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_export_rejects_an_unknown_layout(tmp_path, cfg):
    from training.model import build_model
    with pytest.raises(ValueError, match="layout='fused'.*released.*merged"):
        export_hf(build_model(cfg, "meta").state_dict(), cfg, tmp_path / "x", layout="fused")


def _load_hf_sharded(rank, world, path):
    from tests.engine_cases import make_cfg
    from training.engines import build_engine
    eng = build_engine(make_cfg("native", tp=2, ep=2, etp=2, extra=("train.seed=3",)))
    report = eng.load_hf(path)
    return {"report": report, "state": eng.full_state_dict()}


@pytest.mark.dist
def test_merged_layout_streams_into_tp_ep_etp_shards(tmp_path):
    """Merged expert tensors into native TP=2 x EP=2 x ETP=2: each rank reads only its experts' rows."""
    from tests.dist_helpers import run_distributed
    from tests.engine_cases import make_cfg
    cfg = make_cfg().model
    write_public(tmp_path / "merged", cfg, "merged", seed=4, shards=2)
    write_public(tmp_path / "released", cfg, "released", seed=4)
    _, ref = import_hf(tmp_path / "released")  # the per-expert path, single process
    res = run_distributed(_load_hf_sharded, 4, tmp_path / "merged")
    assert res[0]["report"]["missing"] == [] and res[0]["report"]["unexpected"] == []
    for k, v in ref.state_dict().items():
        assert torch.equal(res[0]["state"][k], v), k


def _save_checkpoint(rank, world, run_dir):
    from tests.engine_cases import make_cfg
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    eng = build_engine(make_cfg("native", ep=2))
    return {"path": str(CheckpointManager(run_dir).save(eng, 1, {})), "state": eng.full_state_dict()}


@pytest.mark.dist
def test_cli_hf_export_layout_merged(tmp_path):
    """`unidiff convert hf-export --layout merged` from an EP=2 checkpoint: the merged names, the saved weights;
    `hf-import` checks the result."""
    from tests.dist_helpers import run_distributed
    saved = run_distributed(_save_checkpoint, 2, tmp_path / "run")[0]
    r = subprocess.run([sys.executable, "-m", "launch.cli", "convert", "hf-export", "configs/model/tiny.yaml",
                        "--checkpoint", saved["path"], "--out", str(tmp_path / "hf"), "--dtype", "float32",
                        "--layout", "merged"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = file_tensors(tmp_path / "hf")
    assert "model.layers.1.mlp.experts.down_proj" in got and not any(".experts.0." in k for k in got)
    for k, v in saved["state"].items():
        assert torch.equal(got[k], v), k
    r = subprocess.run([sys.executable, "-m", "launch.cli", "convert", "hf-import", "--src", str(tmp_path / "hf"),
                        "--out", str(tmp_path / "preset.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # the header check accepts merged tensors
