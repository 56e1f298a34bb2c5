"""LoRA adapters on the one LLaDA2MoE definition (Hu et al. 2021): a targeted weight W [out, in] computes
W x + (alpha / r) B A x with A [r, in], B [out, r]; a routed expert tensor [E, out, in] gets one adapter per expert,
A [E, r, in], B [E, out, r]. B starts at zero, so the adapted model starts as the base.

Adapter names sit next to their base weight, so checkpoints, reshard and grad reduction treat them as any other
parameter: `<linear>.lora_A` / `<linear>.lora_B` beside `<linear>.weight`, and `<experts>.<proj>_lora_A` /
`_lora_B` beside the fused `<experts>.<proj>`. Which weights get adapters and how their shards follow the base's
TP / EP split is decided from outside (training/engines/lora.py); this module holds the arithmetic only.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

# X.lora_A -> X.weight; experts.gate_proj_lora_A -> ...gate_proj (a checkpoint's "optim.exp_avg/<name>" is not one)
_ADAPTER = re.compile(r"^([\w.]*?)(\.|_)lora_(A|B)$")


def is_adapter(name: str) -> bool:
    return _ADAPTER.match(name) is not None


def base_of(name: str) -> str:
    """The base weight an adapter parameter belongs to."""
    stem, sep, _ = _ADAPTER.match(name).groups()
    return f"{stem}.weight" if sep == "." else stem


def delta(module, x: torch.Tensor) -> torch.Tensor:
    """(alpha / r) B A x for a linear layer carrying `lora_A`, `lora_B`, `lora_scale`."""
    return F.linear(F.linear(x, module.lora_A), module.lora_B) * module.lora_scale


def add_delta(module, args, out):
    """Forward hook of an adapted nn.Linear / column-parallel linear (a row-parallel one adds it before its
    reduce instead: tensor_parallel.RowParallelLinear)."""
    return out + delta(module, args[0])


def init_tensor(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """B = 0; A ~ N(0, 1/in), the variance of peft's kaiming-uniform(a=sqrt(5)) init up to a constant."""
    if name.endswith("lora_B"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=gen) / math.sqrt(shape[-1])


@torch.no_grad()
def merge(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict with adapters -> the plain model's: W + scale * B A folded in fp32, adapters dropped."""
    out = {n: t for n, t in state.items() if not is_adapter(n)}
    for name in state:
        if name.endswith("lora_A"):
            base = base_of(name)
            a, b = state[name].float(), state[name[:-1] + "B"].float()
            out[base] = (state[base].float() + scale * (b @ a)).to(state[base].dtype)
    return out
