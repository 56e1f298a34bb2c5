"""HF checkpoint format: official config.json fields and weight names, export -> import round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from training.hf_format import config_from_hf, export_hf, import_hf, read_hf_config
from training.model import build_model

pytestmark = pytest.mark.unit

# The released LLaDA2.0-mini config.json (dFactory configs/model_configs/llada2_mini/config.json), verbatim fields.
OFFICIAL_MINI = {
    "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0, "num_hidden_layers": 20, "hidden_size": 2048,
    "intermediate_size": 5120, "first_k_dense_replace": 1, "hidden_act": "silu", "max_position_embeddings": 16384,
    "model_type": "llada2_moe_veomni", "moe_intermediate_size": 512, "norm_topk_prob": True, "num_experts_per_tok": 8,
    "norm_head": False, "num_attention_heads": 16, "num_experts": 256, "num_key_value_heads": 4, "rope_theta": 600000,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.52.3",
    "use_bias": False, "use_rmsnorm": True, "rms_norm_eps": 1e-06, "head_dim": 128, "num_shared_experts": 1,
    "use_cache": False, "use_qkv_bias": False, "embedding_dropout": 0.0, "norm_softmax": False, "output_dropout": 0.0,
    "vocab_size": 157184, "rotary_dim": 64, "using_split_qkv_in_self_attention": False, "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
    "score_function": "sigmoid", "initializer_range": 0.02, "max_window_layers": 28, "output_router_logits": False,
    "pad_token_id": 156892, "partial_rotary_factor": 0.5, "use_sliding_window": False,
}
# The tiny variant of the same config and the key shapes the official modeling code produces for it.
OFFICIAL_TINY = {**OFFICIAL_MINI, "first_k_dense_replace": 1, "head_dim": 16, "hidden_size": 64,
                 "intermediate_size": 128, "max_position_embeddings": 512, "moe_intermediate_size": 32, "n_group": 2,
                 "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
                 "num_key_value_heads": 2, "num_shared_experts": 1, "pad_token_id": 299, "topk_group": 1,
                 "vocab_size": 300}
OFFICIAL_TINY_SHAPES = {
    "model.word_embeddings.weight": (300, 64), "model.norm.weight": (64,), "lm_head.weight": (300, 64),
    "model.layers.0.attention.query_key_value.weight": (128, 64), "model.layers.0.attention.query_layernorm.weight": (16,),
    "model.layers.0.attention.key_layernorm.weight": (16,), "model.layers.0.attention.dense.weight": (64, 64),
    "model.layers.0.mlp.gate_proj.weight": (128, 64), "model.layers.0.mlp.up_proj.weight": (128, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 128), "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.0.post_attention_layernorm.weight": (64,),
    "model.layers.1.attention.query_key_value.weight": (128, 64), "model.layers.1.attention.query_layernorm.weight": (16,),
    "model.layers.1.attention.key_layernorm.weight": (16,), "model.layers.1.attention.dense.weight": (64, 64),
    "model.layers.1.mlp.experts.gate_proj": (8, 32, 64), "model.layers.1.mlp.experts.up_proj": (8, 32, 64),
    "model.layers.1.mlp.experts.down_proj": (8, 64, 32), "model.layers.1.mlp.gate.weight": (8, 64),
    "model.layers.1.mlp.gate.expert_bias": (8,), "model.layers.1.mlp.shared_experts.gate_proj.weight": (32, 64),
    "model.layers.1.mlp.shared_experts.up_proj.weight": (32, 64),
    "model.layers.1.mlp.shared_experts.down_proj.weight": (64, 32), "model.layers.1.input_layernorm.weight": (64,),
    "model.layers.1.post_attention_layernorm.weight": (64,),
}


def test_official_config_json_loads_with_release_numbers():
    from tests.conftest import ROOT
    from training.config import load_config

    cfg = config_from_hf(OFFICIAL_MINI)
    preset = load_config(ROOT / "configs/model/llada2_mini.yaml").model
    for f in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
              "moe_intermediate_size", "intermediate_size", "first_k_dense_replace", "partial_rotary_factor",
              "rope_theta", "pad_token_id"):
        assert getattr(cfg, f) == getattr(preset, f), f
    assert cfg.image_token_offset == cfg.vocab_size == 157184  # text-only LLaDA2.0: no image rows


def test_official_tiny_config_builds_the_official_state_dict():
    model = build_model(config_from_hf(OFFICIAL_TINY), "meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == OFFICIAL_TINY_SHAPES


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 40_000])
def test_export_then_import_reproduces_logits_exactly(tmp_path, tiny_cfg, max_shard_bytes):
    cfg = dataclasses.replace(tiny_cfg.model, expert_bias_update_rate=0.0)
    model = build_model(cfg, seed=3).eval()
    with torch.no_grad():
        model.moe_layers()[0].gate.expert_bias.copy_(torch.linspace(-0.1, 0.1, cfg.num_experts))
    out = export_hf(model.state_dict(), cfg, tmp_path / "hf", dtype=torch.float32, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in out.iterdir())
    if max_shard_bytes < 2**20:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    keys = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert keys on disk
    assert not any(k.endswith("experts.gate_proj") for k in keys)
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["LLaDA2MoeModelLM"] and hf["image_token_offset"] == cfg.image_token_offset
    cfg2, model2 = import_hf(out)
    assert cfg2 == dataclasses.replace(cfg, **{k: getattr(cfg2, k) for k in ("attention", "grouped_gemm")})
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    assert torch.equal(model(ids).logits, model2.eval()(ids).logits)


def test_import_rejects_mismatched_weights(tmp_path, tiny_cfg):
    model = build_model(tiny_cfg.model, seed=0)
    out = export_hf(model.state_dict(), tiny_cfg.model, tmp_path / "hf", dtype=torch.float32)
    hf = json.loads((out / "config.json").read_text())
    hf["moe_intermediate_size"] = 48
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="checkpoint shape"):
        import_hf(out)
    assert read_hf_config(out).moe_intermediate_size == 48
