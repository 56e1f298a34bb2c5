"""Hugging Face format: `config.json` + (sharded) safetensors with the official LLaDA2.0(-Uni) names.

In memory the experts are fused ([E, I, H] / [E, H, I], the dFactory training layout); on disk, like the released
checkpoints, each expert has its own keys `model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`. Files written
in the fused layout (dFactory's `model_type: llada2_moe_veomni`) are read too.

Import streams one tensor at a time from memory-mapped shards into a model whose parameters were allocated once
(`to_empty`), so a 16B import never holds the model twice.
"""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.config import ConfigError, ModelConfig

# Fields of ModelConfig that are framework settings, not part of the official config.json.
_LOCAL_FIELDS = {"attention", "grouped_gemm", "expert_bias_update_rate", "aux_loss_coeff", "z_loss_coeff"}
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_INDEX = "model.safetensors.index.json"


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOCAL_FIELDS}
    out.update({
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "hidden_act": "silu", "use_qk_norm": True, "use_rmsnorm": True, "norm_topk_prob": True,
        "score_function": "sigmoid", "router_dtype": "fp32", "moe_router_enable_expert_bias": True,
        "rotary_dim": int(cfg.head_dim * cfg.partial_rotary_factor), "rope_scaling": None,
        "torch_dtype": dtype, "use_cache": False,
    })
    return out


def config_from_hf(hf: dict, base: ModelConfig | None = None) -> ModelConfig:
    """Official config.json -> ModelConfig. Behaviour the release hard-codes is checked, not silently assumed."""
    for key, want in (("hidden_act", "silu"), ("score_function", "sigmoid")):
        if key in hf and hf[key] != want:
            raise ConfigError(f"config.json {key}={hf[key]!r} is not supported: unidiff implements {want!r}")
    if hf.get("rope_scaling"):
        raise ConfigError(f"config.json rope_scaling={hf['rope_scaling']!r} is not supported: only null (plain RoPE)")
    names = {f.name for f in dataclasses.fields(ModelConfig)} - _LOCAL_FIELDS
    values = dataclasses.asdict(base or ModelConfig())
    values.update({k: v for k, v in hf.items() if k in names and v is not None})
    if "image_token_offset" not in hf:  # a text-only LLaDA2.0 checkpoint: no image rows
        values["image_token_offset"] = values["vocab_size"]
    values["num_shared_experts"] = values["num_shared_experts"] or 0
    return ModelConfig(**values)


def _export_items(state: dict[str, torch.Tensor]):
    """Fused expert tensors -> per-expert keys, in a stable order."""
    for name in sorted(state):
        t = state[name]
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e]
        else:
            yield name, t


def export_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
              dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write config.json + safetensors shards (+ index when more than one shard)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype_name), indent=2) + "\n")
    shards, cur, size = [], {}, 0
    for key, t in _export_items(state):
        t = t.detach().to("cpu", dtype if t.is_floating_point() and not key.endswith("expert_bias") else t.dtype)
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[key] = t.contiguous()
        size += nbytes
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        (out / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def _shard_files(path: Path) -> list[Path]:
    if (path / _INDEX).exists():
        weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path} (expected model.safetensors or {_INDEX})")
    return files


def read_hf_config(path: str | Path, base: ModelConfig | None = None) -> ModelConfig:
    p = Path(path) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: an HF checkpoint dir holds config.json + safetensors")
    return config_from_hf(json.loads(p.read_text()), base)


@dataclass
class HFTensor:
    """One tensor of an HF checkpoint, mapped to the model's names; `load()` reads it (while the walk is at it)."""
    key: str  # name in the file
    target: str  # parameter / buffer name in the model (fused expert tensors for per-expert keys)
    expert: int | None  # expert index within the fused tensor, for per-expert keys
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def iter_hf_tensors(path: str | Path) -> Iterator[HFTensor]:
    """Every tensor of an HF checkpoint dir, shard by shard, from memory-mapped files (nothing is read until load())."""
    for f in _shard_files(Path(path)):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                m = _EXPERT_KEY.match(key)
                target, expert = (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else (key, None)
                yield HFTensor(key, target, expert, tuple(sf.get_slice(key).get_shape()),
                               lambda sf=sf, key=key: sf.get_tensor(key))


def check_complete(model, filled: dict[str, int], expected: dict[str, int], unexpected: list[str], path) -> dict:
    """Raise naming what an import missed or could not place; else the import report."""
    missing = [n for n, want in expected.items() if filled.get(n, 0) != want
               and not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"HF import of {path}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return {"loaded": sum(filled.values()), "missing": [], "unexpected": []}


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Stream an HF checkpoint into `model` (materialised, any dtype), tensor by tensor; missing or unexpected
    keys raise."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    expected = {name: (t.shape[0] if re.search(r"\.mlp\.experts\.(gate|up|down)_proj$", name) else 1)
                for name, t in params.items()}
    filled: dict[str, int] = {}
    unexpected = []
    for t in iter_hf_tensors(path):
        if t.target not in params:
            unexpected.append(t.key)
            continue
        dst = params[t.target] if t.expert is None else params[t.target][t.expert]
        if tuple(dst.shape) != t.shape:
            raise ValueError(f"{t.key}: checkpoint shape {t.shape} != model shape {tuple(dst.shape)}; "
                             "does config.json match the weights?")
        dst.copy_(t.load().to(dst.dtype))
        filled[t.target] = filled.get(t.target, 0) + 1
    return check_complete(model, filled, expected, unexpected, path)


def import_hf(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, base=None):
    """config.json + weights -> (ModelConfig, LLaDA2MoE) built on meta, allocated once, then streamed."""
    from training.model import build_model

    cfg = read_hf_config(path, base)
    model = build_model(cfg, "meta")
    model.to_empty(device=device)
    model.to(dtype)
    for moe in model.moe_layers():  # the bias is kept in fp32 whatever the weights' dtype
        moe.gate.expert_bias.data = moe.gate.expert_bias.data.float()
    load_hf_weights(model, path)
    return cfg, model
