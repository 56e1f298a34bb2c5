"""Hugging Face format: `config.json` + (sharded) safetensors with the official LLaDA2.0(-Uni) names.

Two public layouts differ only in the routed experts of MoE layers:
  released  (`model_type: llada2_moe`, the HF releases): `model.layers.N.mlp.experts.{e}.{gate,up,down}_proj.weight`,
            one [I, H] / [I, H] / [H, I] tensor per expert.
  merged    (`model_type: llada2_moe_veomni`, dFactory's training layout; its scripts/moe_convertor.py stacks the
            released tensors on a new dim 0): `model.layers.N.mlp.experts.{gate,up,down}_proj`, [E, I, H] / [E, H, I].
In memory the experts are merged, so the merged layout is the model's own state dict. Import tells the layouts apart
by key, not by `model_type` (dFactory's convertor copies config.json unchanged), and a checkpoint may mix them as
long as no expert is written twice. Export writes either (`released` by default).

Import streams one tensor at a time from memory-mapped shards into a model whose parameters were allocated once
(`to_empty`), so a 16B import never holds the model twice; under EP/ETP each rank reads only its experts' box of a
merged tensor.
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
_LOCAL_FIELDS = {"attention", "grouped_gemm", "expert_bias_update_rate", "aux_loss_coeff", "z_loss_coeff", "lora"}
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MERGED_KEY = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")
_INDEX = "model.safetensors.index.json"
MODEL_TYPES = {"released": "llada2_moe", "merged": "llada2_moe_veomni"}  # layout -> config.json model_type


def _check_layout(layout: str) -> None:
    if layout not in MODEL_TYPES:
        raise ValueError(f"layout={layout!r} is not allowed: must be one of {' | '.join(MODEL_TYPES)}")


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16", layout: str = "released") -> dict:
    _check_layout(layout)
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _LOCAL_FIELDS}
    out.update({
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": MODEL_TYPES[layout],
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
    values["lora"] = (base or ModelConfig()).lora  # a run setting (asdict made it a dict)
    return ModelConfig(**values)


def _export_items(state: dict[str, torch.Tensor], layout: str):
    """(key, tensor) in a stable order: the model's merged experts as they are, or split one key per expert."""
    for name in sorted(state):
        t = state[name]
        m = _MERGED_KEY.match(name)
        if m and layout == "released":
            for e in range(t.shape[0]):
                yield f"{name[:m.start(1)]}{e}.{m.group(1)}.weight", t[e]
        else:
            yield name, t


def export_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
              dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30, layout: str = "released") -> Path:
    """Write config.json + safetensors shards (+ index when more than one shard) in `layout` (released | merged)."""
    _check_layout(layout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype_name = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype_name, layout), indent=2) + "\n")
    shards, cur, size = [], {}, 0
    for key, t in _export_items(state, layout):
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
    """One tensor of an HF checkpoint, mapped to the model's names; nothing is read until `load()` / `rows()`."""
    key: str  # name in the file
    target: str  # parameter / buffer name in the model (the merged expert tensor for per-expert keys)
    experts: range | None  # routed-expert tensors: the global expert ids this key holds (one, or all for merged)
    shape: tuple[int, ...]  # shape in the file
    load: Callable[[], torch.Tensor]
    rows: Callable[..., torch.Tensor] | None = None  # rows(lo, hi, sub=None) -> experts [lo, hi) as [hi - lo, ...]

    def fits(self, model_shape: tuple[int, ...]) -> bool:
        """Does this key's tensor belong in a model tensor of `model_shape` (the full, unsharded shape)?"""
        model_shape = tuple(model_shape)
        if len(self.shape) == len(model_shape):  # a plain or a merged tensor: the model's own shape
            return self.shape == model_shape
        return self.experts is not None and self.shape == model_shape[1:] and self.experts.stop <= model_shape[0]


def _rows_reader(sf, key: str, first: int, stacked: bool, ndim: int):
    """Read experts [lo, hi) of `key` straight from the memory map, as a stacked [hi - lo, ...] tensor; `sub` =
    (dim, start, length) in stacked dims narrows a second dim too (ETP), so a rank reads its own box and no more."""
    def rows(lo: int, hi: int, sub=None) -> torch.Tensor:
        index = [slice(lo - first, hi - first)] + [slice(None)] * (ndim - stacked)
        if sub is not None:
            index[sub[0]] = slice(sub[1], sub[1] + sub[2])
        if stacked:
            return sf.get_slice(key)[tuple(index)]
        return sf.get_slice(key)[tuple(index[1:])].unsqueeze(0)
    return rows


def iter_hf_tensors(path: str | Path) -> Iterator[HFTensor]:
    """Every tensor of an HF checkpoint dir, shard by shard, from memory-mapped files, in either expert layout."""
    for f in _shard_files(Path(path)):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                shape = tuple(sf.get_slice(key).get_shape())
                load = (lambda sf=sf, key=key: sf.get_tensor(key))
                if m := _EXPERT_KEY.match(key):
                    e = int(m.group(2))
                    yield HFTensor(key, f"{m.group(1)}.{m.group(3)}", range(e, e + 1), shape, load,
                                   _rows_reader(sf, key, e, False, len(shape)))
                elif _MERGED_KEY.match(key) and len(shape) == 3:
                    yield HFTensor(key, key, range(shape[0]), shape, load, _rows_reader(sf, key, 0, True, len(shape)))
                else:
                    yield HFTensor(key, key, None, shape, load)


def _mark(filled: dict[str, set[int]], target: str, ids: range, key: str) -> None:
    seen = filled.setdefault(target, set())
    if twice := seen.intersection(ids):
        raise ValueError(f"{key}: {target} (expert ids {sorted(twice)[:5]}) is written twice: the checkpoint holds "
                         "the same weight under two keys (merged and per-expert?); keep one layout")
    seen.update(ids)


def check_complete(model, filled: dict[str, set[int]], expected: dict[str, int], unexpected: list[str], path) -> dict:
    """Raise naming what an import missed or could not place; else the import report. `filled` holds, per model
    tensor, the expert ids written (0 for a plain tensor); `expected` how many this rank must hold."""
    missing = [n for n, want in expected.items() if len(filled.get(n, ())) != want
               and not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"HF import of {path}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return {"loaded": sum(map(len, filled.values())), "missing": [], "unexpected": []}


@torch.no_grad()
def load_hf_shards(model: torch.nn.Module, local: dict[str, torch.Tensor], specs: dict, path: str | Path) -> dict:
    """Stream an HF checkpoint into this rank's `local` tensors (model names), each placed in the full tensor by
    its `ShardSpec`: plain tensors are sliced from the full one; routed experts are read one expert (released)
    or one box of rows (merged) at a time. Missing, unexpected or doubly written keys raise."""
    expected = {n: (specs[n].local_shape[0] if _MERGED_KEY.match(n) else 1) for n in local}
    filled: dict[str, set[int]] = {}
    unexpected = []
    for t in iter_hf_tensors(path):
        if t.target not in local:
            unexpected.append(t.key)
            continue
        spec, dst = specs[t.target], local[t.target]
        if not t.fits(spec.global_shape):
            raise ValueError(f"{t.key}: checkpoint shape {t.shape} != model shape {tuple(spec.global_shape)}; "
                             "does config.json match the weights?")
        if t.experts is None:
            dst.copy_(spec.slice_full(t.load()).to(dst.dtype))
            _mark(filled, t.target, range(1), t.key)
            continue
        for local_start, global_start, n in spec.pieces:  # dim 0 = expert id
            lo, hi = max(t.experts.start, global_start), min(t.experts.stop, global_start + n)
            if lo < hi:
                at = local_start + lo - global_start
                dst[at:at + hi - lo].copy_(t.rows(lo, hi, spec.sub).to(dst.dtype))
                _mark(filled, t.target, range(lo, hi), t.key)
    return check_complete(model, filled, expected, unexpected, path)


def load_hf_weights(model: torch.nn.Module, path: str | Path) -> dict:
    """Stream an HF checkpoint into `model` (materialised, unsharded, any dtype), tensor by tensor."""
    from training.engines.sharding import ShardSpec

    local = dict(model.named_parameters())
    local.update(dict(model.named_buffers()))
    return load_hf_shards(model, local, {n: ShardSpec.replicated(t.shape) for n, t in local.items()}, path)


def import_hf(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, base=None):
    """config.json + weights -> (ModelConfig, LLaDA2MoE) built on meta, allocated once, then streamed."""
    from training.model import build_model

    cfg = read_hf_config(path, base)
    model = build_model(cfg, "meta")
    model.to_empty(device=device)
    cast_model(model, dtype)
    load_hf_weights(model, path)
    return cfg, model


def cast_model(model, dtype: torch.dtype):
    """Weights to `dtype`; the router's expert bias is kept in fp32 whatever the weights' dtype (the router scores
    in fp32 as released, and the bias is added to those scores before the top-k)."""
    model.to(dtype)
    for moe in model.moe_layers():
        moe.gate.expert_bias.data = moe.gate.expert_bias.data.float()
    return model
