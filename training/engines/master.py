"""train.precision=bf16 for the native engine: bf16 module parameters, fp32 master weights owned by the optimizer,
fp32 gradient accumulation — the contract megatron's `OptimizerConfig(bf16=True)` + `grad_reduce_in_fp32` and
DeepSpeed's `bf16` section implement for the other engines.

Each backward leaves a bf16 `.grad` on the module parameter; a post-accumulate hook adds it into the master's fp32
`.grad` and frees it, so micro-batches accumulate in fp32 (a bf16 sum of 8 micro-batches loses ~3 bits). The
optimizer steps the masters; `copy_back` rounds them into the module once per step. Buffers (the router's
`expert_bias`) are not touched and stay fp32; the router computes its scores in fp32 from the bf16 weight, as
released.
"""
from __future__ import annotations

import torch


class MasterWeights:
    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.of: dict[torch.nn.Parameter, torch.nn.Parameter] = {}  # module param -> its fp32 master
        for p in model.parameters():
            p.data = p.data.to(dtype)  # the same Parameter object: hooks and attributes set on it stay valid
            if p.requires_grad:  # frozen weights are only cast: no master, no optimizer state
                # from the bf16 value, as megatron's and DeepSpeed's masters start: every engine's run is the same
                master = torch.nn.Parameter(p.detach().float())
                p.register_post_accumulate_grad_hook(lambda q, m=master: _accumulate(q, m))
                self.of[p] = master

    @torch.no_grad()
    def copy_back(self) -> None:
        """Masters -> module parameters (rounded to bf16), after each step and after a load into the masters."""
        for p, m in self.of.items():
            p.copy_(m)


@torch.no_grad()
def _accumulate(param: torch.Tensor, master: torch.Tensor) -> None:
    if master.grad is None:
        master.grad = param.grad.float()
    else:
        master.grad.add_(param.grad)
    param.grad = None
