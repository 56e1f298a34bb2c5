"""Expert parallelism: routed experts split over an expert-parallel group, tokens exchanged with all-to-all.

Each EP rank keeps experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE layer (a slice of the fused
gate/up/down tensors) and the full replicated router, so routing is computed locally exactly as in one process.
`AllToAllDispatcher` replaces `MoE.dispatcher`:

    pairs sorted by global expert id -> (they are then grouped by destination rank, experts being contiguous)
    all_to_all counts [ep, E_local]  -> split sizes both ways
    all_to_all_single rows (uneven)  -> rows from every source, regrouped by local expert
    Experts.forward (grouped matmul) -> all_to_all back -> unsort to idx.flatten() order

`all_to_all_single` with uneven splits works on gloo and nccl (measured, research note section 2); the autograd
function below sends gradients back along the reverse route. Used by the native and megatron engines (and deepspeed).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from training.engines.sharding import ShardSpec


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.group, ctx.send_splits, ctx.recv_splits = group, send_splits, recv_splits
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0."""
    return _AllToAll.apply(x, send_splits, recv_splits, group)


class AllToAllDispatcher:
    """Drop-in for `LocalDispatcher` under expert parallelism (same call contract)."""

    def __init__(self, group, ep_size: int):
        self.group = group
        self.ep_size = ep_size

    def __call__(self, experts, x: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
        ep, k = self.ep_size, idx.shape[1]
        local_e = num_experts // ep
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # [ep, E_local]: rows from src s for expert e
        send_splits = counts.view(ep, local_e).sum(1).tolist()
        recv_matrix = recv_counts.view(ep, local_e)
        recv_splits = recv_matrix.sum(1).tolist()

        recv_x = all_to_all(x[order // k], send_splits, recv_splits, self.group)
        # Rows arrive grouped by source rank, then by local expert; regroup by local expert for the grouped matmul.
        expert_of_row = torch.repeat_interleave(torch.arange(local_e, device=x.device).repeat(ep),
                                                recv_matrix.flatten())
        regroup = expert_of_row.argsort(stable=True)
        y_sorted = experts(recv_x[regroup], recv_matrix.sum(0).tolist())
        if recv_x.shape[0] == 0:
            # No token reached this rank's experts: keep them in the graph so every rank's grad hooks fire
            # (deepspeed ZeRO and megatron DDP expect a grad for every parameter).
            y_sorted = y_sorted + 0.0 * sum(p.sum() for p in experts.parameters())
        y = torch.empty_like(y_sorted)
        y[regroup] = y_sorted
        back = all_to_all(y, recv_splits, send_splits, self.group)
        out = torch.empty_like(back)
        out[order] = back
        return out


def shard_experts(model, specs: dict[str, ShardSpec], ep_rank: int, ep_size: int, group) -> None:
    """Replace each MoE's fused expert parameters with this rank's slice (meta or real) and install the
    all-to-all dispatcher. ep_size == 1 keeps the experts whole and local, but they are still of kind "expert":
    their gradient is the sum of every rank's token contributions (tokens are split over TP ranks), divided by DP."""
    for li, moe in _moe_layers_named(model):
        if ep_size == 1:
            for pname in ("gate_proj", "up_proj", "down_proj"):
                specs[f"{li}.experts.{pname}"].kind = "expert"
            continue
        e = moe.num_experts
        if e % ep_size:
            raise ValueError(f"model.num_experts={e} is not divisible by parallel.expert={ep_size}")
        n = e // ep_size
        for pname in ("gate_proj", "up_proj", "down_proj"):
            full = getattr(moe.experts, pname)
            local = torch.nn.Parameter(full.detach()[ep_rank * n:(ep_rank + 1) * n].clone()
                                       if full.device.type != "meta" else
                                       torch.empty((n,) + tuple(full.shape[1:]), device="meta", dtype=full.dtype))
            setattr(moe.experts, pname, local)
            specs[f"{li}.experts.{pname}"] = ShardSpec(global_shape=tuple(full.shape), dim=0,
                                                       pieces=[(0, ep_rank * n, n)], kind="expert")
        moe.dispatcher = AllToAllDispatcher(group, ep_size)


def _moe_layers_named(model):
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            yield f"model.layers.{i}.mlp", layer.mlp
