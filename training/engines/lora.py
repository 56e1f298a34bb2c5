"""`model.lora`: freeze the (already TP/EP-sharded, meta) model and add adapters whose shards follow their base
weight's split, each with a `ShardSpec`, so checkpoints, reshard, HF import and the engines' grad reduction handle
them as any other parameter (the arithmetic: training/model/lora.py).

    base weight                      A [r, in]                          B [out, r]
    replicated (no TP, shared exp.)  replicated                         replicated        (tp_partial as the base)
    column parallel (qkv, gate/up)   replicated, grad tp_partial        split as the base's output rows (3 pieces
                                     (each rank's B columns)            of [q|k|v] for query_key_value)
    row parallel (dense, down)       split as the base's input columns  replicated, grad tp_partial (B A_r x_r is
                                                                        added before the row reduce)
    routed experts [E, out, in]      [E, r, in] split over EP on dim 0  [E, out, r] split over EP on dim 0

Routed-expert adapters under expert-tensor parallelism would need an ETP-partial grad for A: refused by the config.
"""
from __future__ import annotations

import torch
from torch import nn

from training.engines.sharding import ShardSpec
from training.engines.tensor_parallel import RowParallelLinear
from training.model import lora
from training.model.moe import Experts

_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def apply_lora(model, specs: dict[str, ShardSpec], lcfg) -> None:
    """With lcfg.rank > 0: every parameter frozen, adapters (trainable, fp32) added on the targets. Call after
    apply_tensor_parallel / shard_experts and before materialising (the adapters are created on the base's device)."""
    if lcfg.rank <= 0:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    scale = lcfg.alpha / lcfg.rank
    for prefix, module in targets(model, lcfg.targets):
        if isinstance(module, Experts):
            _expert_adapters(module, prefix, specs, lcfg.rank, scale)
        else:
            _linear_adapters(module, prefix, specs, lcfg.rank, scale)


def targets(model, names) -> list[tuple[str, nn.Module]]:
    """(module name, module) of every adapted weight for the config's target names."""
    out = []
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        if "attention_qkv" in names:
            out.append((f"{p}.attention.query_key_value", layer.attention.query_key_value))
        if "attention_out" in names:
            out.append((f"{p}.attention.dense", layer.attention.dense))
        mlps = []
        if not layer.is_moe and "dense_mlp" in names:
            mlps.append((f"{p}.mlp", layer.mlp))
        if layer.is_moe and "shared_expert" in names and layer.mlp.shared_experts is not None:
            mlps.append((f"{p}.mlp.shared_experts", layer.mlp.shared_experts))
        for q, mlp in mlps:
            out += [(f"{q}.{w}", getattr(mlp, w)) for w in _EXPERT_WEIGHTS]
        if layer.is_moe and "routed_experts" in names:
            out.append((f"{p}.mlp.experts", layer.mlp.experts))
    return out


def _param(shape, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device=like.device, dtype=torch.float32))


def _linear_adapters(module, prefix: str, specs, r: int, scale: float) -> None:
    base = specs[f"{prefix}.weight"]
    out_f, in_f = base.global_shape
    if base.kind == "tp" and base.dim == 1:  # row parallel
        a = ShardSpec((r, in_f), 1, list(base.pieces), kind="tp")
        b = ShardSpec.replicated((out_f, r))
        b.tp_partial = True
    elif base.kind == "tp":  # column parallel
        a = ShardSpec.replicated((r, in_f))
        a.tp_partial = True
        b = ShardSpec((out_f, r), 0, list(base.pieces), kind="tp")
    else:  # replicated (the shared expert under TP sees this rank's tokens: partial like its base)
        a, b = ShardSpec.replicated((r, in_f)), ShardSpec.replicated((out_f, r))
        a.tp_partial = b.tp_partial = base.tp_partial
    module.lora_A, module.lora_B = _param(a.local_shape, module.weight), _param(b.local_shape, module.weight)
    module.lora_scale = scale
    specs[f"{prefix}.lora_A"], specs[f"{prefix}.lora_B"] = a, b
    if not isinstance(module, RowParallelLinear):
        module.register_forward_hook(lora.add_delta)


def _expert_adapters(experts: Experts, prefix: str, specs, r: int, scale: float) -> None:
    for name in _EXPERT_WEIGHTS:
        base = specs[f"{prefix}.{name}"]
        if base.sub is not None:
            raise ValueError("LoRA on routed experts under parallel.expert_tensor > 1 is not supported")
        e, out_f, in_f = base.global_shape
        a = ShardSpec((e, r, in_f), 0, list(base.pieces), kind=base.kind)
        b = ShardSpec((e, out_f, r), 0, list(base.pieces), kind=base.kind)
        w = getattr(experts, name)
        setattr(experts, f"{name}_lora_A", _param(a.local_shape, w))
        setattr(experts, f"{name}_lora_B", _param(b.local_shape, w))
        specs[f"{prefix}.{name}_lora_A"], specs[f"{prefix}.{name}_lora_B"] = a, b
    experts.lora_scale = scale


def lora_model(mcfg, device="cpu", seed: int = 0):
    """A single-process model with the config's adapters (the unsharded reference; tests, merge checks)."""
    from training.engines.sharding import default_specs
    from training.model import build_model
    model = build_model(mcfg, "meta")
    apply_lora(model, default_specs(model), mcfg.lora)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
