"""Expert parallelism: routed experts split over an expert-parallel group, tokens exchanged with all-to-all.

Each EP rank keeps experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of every MoE layer (a slice of the fused
gate/up/down tensors) and the full replicated router, so routing is computed locally exactly as in one process.
`AllToAllDispatcher` replaces `MoE.dispatcher`:

    pairs sorted by global expert id -> (they are then grouped by destination rank, experts being contiguous)
    all_to_all counts [ep, E_local]  -> split sizes both ways
    all_to_all_single rows (uneven)  -> rows from every source, regrouped by local expert
    Experts.forward (grouped matmul) -> all_to_all back -> unsort to idx.flatten() order

Expert-tensor parallelism (ETP) additionally cuts every local expert's intermediate dim over an ETP group (gate/up
rows, down columns; megatron's layout): after the EP exchange the rows are all-gathered over the ETP group, each ETP
rank computes its partial output for all of them with its intermediate slice, and a reduce-scatter sums the partials
back to the rank the rows came from (megatron's MoEAlltoAllTokenDispatcher with expert_tensor_parallel_size > 1).

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


def _etp_gather(x: torch.Tensor, rows: list[int], rank: int, group) -> torch.Tensor:
    """Uneven all-gather along dim 0 over the ETP group (rows[j] from rank j); its gradient sums the ranks' grads."""
    return all_to_all(x.repeat(len(rows), *([1] * (x.dim() - 1))), [rows[rank]] * len(rows), rows, group)


def _etp_reduce_scatter(y: torch.Tensor, rows: list[int], rank: int, group) -> torch.Tensor:
    """Inverse of `_etp_gather`: rank j gets the sum over the group of every rank's rows for j."""
    parts = all_to_all(y, rows, [rows[rank]] * len(rows), group)
    return parts.view(len(rows), rows[rank], *y.shape[1:]).sum(0)


class AllToAllDispatcher:
    """Drop-in for `LocalDispatcher` under expert (and expert-tensor) parallelism (same call contract)."""

    def __init__(self, group, ep_size: int, etp_group=None, etp_size: int = 1, etp_rank: int = 0):
        self.group, self.ep_size = group, ep_size
        self.etp_group, self.etp_size, self.etp_rank = etp_group, etp_size, etp_rank

    def __call__(self, experts, x: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
        ep, k = self.ep_size, idx.shape[1]
        local_e = num_experts // ep
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        if ep > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.group)  # [ep, E_local]: from src s for expert e
            recv_matrix = recv_counts.view(ep, local_e)
            # The split sizes must be host ints: read them in one device-to-host copy per layer, not three.
            sizes = torch.cat([counts.view(ep, local_e).sum(1), recv_matrix.sum(1), recv_matrix.sum(0)]).tolist()
            send_splits, recv_splits, per_expert = sizes[:ep], sizes[ep:2 * ep], sizes[2 * ep:]
            recv_x = all_to_all(x[order // k], send_splits, recv_splits, self.group)
        else:
            recv_matrix, recv_x = counts.view(1, local_e), x[order // k]
            per_expert = None
        if self.etp_size > 1:
            # Every ETP peer's rows (grouped by its sources, then local expert) concatenated in peer order.
            mats = [torch.empty_like(recv_matrix) for _ in range(self.etp_size)]
            dist.all_gather(mats, recv_matrix.contiguous(), group=self.etp_group)
            recv_matrix = torch.cat(mats)
            sizes = torch.cat([torch.stack([m.sum() for m in mats]), recv_matrix.sum(0)]).tolist()
            rows, per_expert = sizes[:self.etp_size], sizes[self.etp_size:]
            recv_x = _etp_gather(recv_x, rows, self.etp_rank, self.etp_group)
        # Rows arrive grouped by source, then by local expert; regroup by local expert for the grouped matmul.
        expert_of_row = torch.repeat_interleave(torch.arange(local_e, device=x.device).repeat(recv_matrix.shape[0]),
                                                recv_matrix.flatten(), output_size=recv_x.shape[0])  # no sync
        regroup = expert_of_row.argsort(stable=True)
        y_sorted = experts(recv_x[regroup], per_expert if per_expert is not None else recv_matrix.sum(0).tolist())
        if recv_x.shape[0] == 0:
            # No token reached this rank's experts: keep them in the graph so every rank's grad hooks fire
            # (deepspeed ZeRO and megatron DDP expect a grad for every parameter).
            y_sorted = y_sorted + 0.0 * sum(p.sum() for p in experts.parameters())
        y = torch.empty_like(y_sorted)
        y[regroup] = y_sorted
        if self.etp_size > 1:  # partial sums over the intermediate slices -> this rank's rows, complete
            y = _etp_reduce_scatter(y, rows, self.etp_rank, self.etp_group)
        back = all_to_all(y, recv_splits, send_splits, self.group) if ep > 1 else y
        out = torch.empty_like(back)
        out[order] = back
        return out


# Which dim of each fused expert tensor is the intermediate one (gate/up [E, I, H], down [E, H, I]).
_INTER_DIM = {"gate_proj": 1, "up_proj": 1, "down_proj": 2}


def shard_experts(model, specs: dict[str, ShardSpec], world) -> None:
    """Replace each MoE's fused expert parameters with this rank's box (meta or real): experts split on dim 0 over
    EP, the intermediate dim over ETP; install the all-to-all dispatcher. EP = ETP = 1 keeps the experts whole and
    local, but they are still of kind "expert": their gradient is the sum of every rank's token contributions
    (tokens are split over TP ranks), divided by DP."""
    ep, etp = world.ep_size, world.etp_size
    for li, moe in _moe_layers_named(model):
        if ep == 1 and etp == 1:
            for pname in _INTER_DIM:
                specs[f"{li}.experts.{pname}"].kind = "expert"
            continue
        e = moe.num_experts
        if e % ep:
            raise ValueError(f"model.num_experts={e} is not divisible by parallel.expert={ep}")
        n = e // ep
        for pname, d in _INTER_DIM.items():
            full = getattr(moe.experts, pname)
            inter = full.shape[d]
            if inter % etp:
                raise ValueError(f"model.moe_intermediate_size={inter} is not divisible by parallel.expert_tensor={etp}")
            m = inter // etp
            local = full.detach()[world.ep_rank * n:(world.ep_rank + 1) * n].narrow(d, world.etp_rank * m, m)
            local = torch.nn.Parameter(local.clone() if full.device.type != "meta" else
                                       torch.empty(local.shape, device="meta", dtype=full.dtype))
            setattr(moe.experts, pname, local)
            specs[f"{li}.experts.{pname}"] = ShardSpec(
                global_shape=tuple(full.shape), dim=0, pieces=[(0, world.ep_rank * n, n)], kind="expert",
                sub=(d, world.etp_rank * m, m) if etp > 1 else None)
        moe.dispatcher = AllToAllDispatcher(world.ep_group, ep, world.etp_group, etp, world.etp_rank)


def _moe_layers_named(model):
    for i, layer in enumerate(model.model.layers):
        if layer.is_moe:
            yield f"model.layers.{i}.mlp", layer.mlp
