"""Tensor (and sequence) parallelism applied to the one LLaDA2MoE definition from outside, Megatron style.

What is split over the TP group (column = output rows, row = input columns):
    attention.query_key_value  column, this rank's heads: [q_local | k_local | v_local] (three pieces of [q|k|v])
    attention.dense            row
    dense MLP gate/up, down    column, row
    lm_head                    vocab rows, with the vocab-parallel cross-entropy (vocab_parallel.py)
Replicated: embeddings, norms, q/k head norms, router, shared expert, (routed experts: expert_parallel.py).
Attention derives its local head counts from its weight, so the sharded module runs unchanged.

The MoE block sees the same tokens on every TP rank; before routing, each TP rank keeps 1/tp of them (whole
sequences when the batch divides, else a slice of the sequence) and the outputs are all-gathered afterwards.
Routing and expert compute are then never duplicated, the expert-parallel group may overlap the TP group (megatron's
"MoE parallel folding"), and the replicated router/shared expert get partial gradients that are summed over TP.
With sequence parallelism the hidden states between blocks are already sequence shards of [B, L/tp, H]: the
column-parallel input all-gathers the sequence, the row-parallel output reduce-scatters it, norms run on shards.

The communication primitives come from a `comm` object so the megatron engine can use megatron-core's mappings
and the others the torch-native ones below (same semantics: megatron `tensor_parallel.mappings`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.engines.sharding import ShardSpec
from training.engines.vocab_parallel import shard_lm_head
from training.model import lora


# ---- torch-native autograd collectives over one process group (gloo or nccl) ---------------------------------

def _all_reduce(x, group):
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split(x, dim, group):
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(n, dim=dim)[r].contiguous()


def _gather(x, dim, group):
    n = dist.get_world_size(group)
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((n * xt.shape[0],) + tuple(xt.shape[1:]))
    dist.all_gather_into_tensor(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x, dim, group):
    n = dist.get_world_size(group)
    xt = x.movedim(dim, 0).contiguous()
    out = xt.new_empty((xt.shape[0] // n,) + tuple(xt.shape[1:]))
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.movedim(0, dim).contiguous()


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, grad_is_partial):
        ctx.dim, ctx.group, ctx.partial = dim, group, grad_is_partial
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.partial:
            return _reduce_scatter(g, ctx.dim, ctx.group), None, None, None
        return _split(g, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.dim, ctx.group), None, None


class TorchTPComm:
    """Megatron's region semantics over a torch process group."""

    def __init__(self, group):
        self.group = group

    def copy_to(self, x):  # fwd identity, bwd all-reduce
        return _Copy.apply(x, self.group)

    def reduce_from(self, x):  # fwd all-reduce, bwd identity
        return _Reduce.apply(x, self.group)

    def scatter(self, x, dim):  # fwd split, bwd all-gather
        return _Scatter.apply(x, dim, self.group)

    def gather(self, x, dim, grad_is_partial=False):  # fwd all-gather, bwd split (or reduce-scatter)
        return _Gather.apply(x, dim, self.group, grad_is_partial)

    def reduce_scatter(self, x, dim):  # fwd reduce-scatter, bwd all-gather
        return _ReduceScatter.apply(x, dim, self.group)


# ---- parallel linear layers (same parameter names as nn.Linear: weight, bias) --------------------------------

class ColumnParallelLinear(nn.Module):
    """Output rows of this rank. Its input enters the TP region once per consuming block (a pre-hook on attention /
    the dense MLP: copy_to, or the sequence all-gather under SP), so fused consumers (gate and up) share it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.comm, self.sp = comm, sequence_parallel

    def forward(self, x):  # x: already entered the TP region (see _enter_tp_region)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, comm, sequence_parallel: bool):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.comm, self.sp = comm, sequence_parallel

    def forward(self, x):
        y = F.linear(x, self.weight)
        if hasattr(self, "lora_A"):  # LoRA (engines/lora.py) before the reduce: the TP ranks' B A_r x_r sum to B A x
            y = y + lora.delta(self, x)
        y = self.comm.reduce_scatter(y, 1) if self.sp else self.comm.reduce_from(y)
        return y + self.bias if self.bias is not None else y


def _shard_rows(t: torch.Tensor, pieces) -> torch.Tensor:
    if t.device.type == "meta":
        return torch.empty((sum(p[2] for p in pieces),) + tuple(t.shape[1:]), device="meta", dtype=t.dtype)
    return torch.cat([t.detach()[g:g + n] for _, g, n in pieces]).clone()


def _shard_cols(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    if t.device.type == "meta":
        return torch.empty(tuple(t.shape[:-1]) + (n,), device="meta", dtype=t.dtype)
    return t.detach()[..., start:start + n].clone()


def _pieces(segments: list[int], rank: int, size: int) -> list[tuple[int, int, int]]:
    """This rank's 1/size of each consecutive segment of a fused dim: [(local_start, global_start, length)]."""
    out, g0, l0 = [], 0, 0
    for seg in segments:
        n = seg // size
        out.append((l0, g0 + rank * n, n))
        g0, l0 = g0 + seg, l0 + n
    return out


def _column(parent: nn.Module, attr: str, prefix: str, specs, segments, rank, size, comm, sp):
    lin = getattr(parent, attr)
    pieces = _pieces(segments, rank, size)
    w = _shard_rows(lin.weight, pieces)
    b = _shard_rows(lin.bias, pieces) if lin.bias is not None else None
    setattr(parent, attr, ColumnParallelLinear(w, b, comm, sp))
    specs[f"{prefix}.weight"] = ShardSpec(tuple(lin.weight.shape), 0, pieces, kind="tp")
    if b is not None:
        specs[f"{prefix}.bias"] = ShardSpec(tuple(lin.bias.shape), 0, pieces, kind="tp")


def _row(parent: nn.Module, attr: str, prefix: str, specs, rank, size, comm, sp):
    lin = getattr(parent, attr)
    n = lin.weight.shape[1] // size
    w = _shard_cols(lin.weight, rank * n, n)
    b = lin.bias.detach().clone() if lin.bias is not None else None
    setattr(parent, attr, RowParallelLinear(w, b, comm, sp))
    specs[f"{prefix}.weight"] = ShardSpec(tuple(lin.weight.shape), 1, [(0, rank * n, n)], kind="tp")
    if b is not None:
        specs[f"{prefix}.bias"].tp_partial = sp  # replicated bias added after a reduce-scatter: shard grads


def apply_tensor_parallel(model, specs: dict[str, ShardSpec], tp_rank: int, tp_size: int, comm,
                          sequence_parallel: bool = False) -> None:
    """Shard `model` (meta or materialised) in place for TP rank `tp_rank` of `tp_size`; updates `specs`."""
    if tp_size == 1:
        return
    cfg = model.config
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if nh % tp_size or nkv % tp_size:
        raise ValueError(f"attention heads ({nh} query, {nkv} key/value) are not divisible by parallel.tensor="
                         f"{tp_size}")
    sp = sequence_parallel
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        att = layer.attention
        _column(att, "query_key_value", f"{p}.attention.query_key_value", specs, [nh * hd, nkv * hd, nkv * hd],
                tp_rank, tp_size, comm, sp)
        _row(att, "dense", f"{p}.attention.dense", specs, tp_rank, tp_size, comm, sp)
        att.register_forward_pre_hook(_enter_tp_region(comm, sp))
        for norm in ("query_layernorm", "key_layernorm"):  # applied to this rank's heads only
            specs[f"{p}.attention.{norm}.weight"].tp_partial = True
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs[f"{p}.{norm}.weight"].tp_partial = sp
        if layer.is_moe:
            moe = layer.mlp
            for name, _ in moe.named_parameters():
                if not name.startswith("experts."):  # router and shared expert see this rank's tokens only
                    specs[f"{p}.mlp.{name}"].tp_partial = True
            moe.register_forward_pre_hook(_MoETokenSplit(comm, tp_size, sp).pre)
        else:
            inter = layer.mlp.gate_proj.weight.shape[0]
            if inter % tp_size:
                raise ValueError(f"model.intermediate_size={inter} is not divisible by parallel.tensor={tp_size}")
            _column(layer.mlp, "gate_proj", f"{p}.mlp.gate_proj", specs, [inter], tp_rank, tp_size, comm, sp)
            _column(layer.mlp, "up_proj", f"{p}.mlp.up_proj", specs, [inter], tp_rank, tp_size, comm, sp)
            _row(layer.mlp, "down_proj", f"{p}.mlp.down_proj", specs, tp_rank, tp_size, comm, sp)
            layer.mlp.register_forward_pre_hook(_enter_tp_region(comm, sp))
    shard_lm_head(model, specs, tp_rank, tp_size, comm)
    if sp:
        specs["model.norm.weight"].tp_partial = True
        # Sequence shards between the embedding and the head: split before the first block, gather before lm_head.
        model.model.layers[0].register_forward_pre_hook(_sequence_split(comm, tp_size))
        # after the final norm (position-wise), so the logits and the hidden states the loss takes are both whole:
        # logits_to_keep and the loss's masked selection index full sequences (x_t || x_0: the x_t half)
        model.model.norm.register_forward_hook(lambda mod, args, out: comm.gather(out, 1))


def _sequence_split(comm, tp_size: int):
    """Pre-hook of the first block under SP: this rank's 1/tp of the positions (equal shards: the gathers assume
    them)."""
    def hook(module, args):
        length = args[0].shape[1]
        if length % tp_size:
            raise ValueError(f"sequence parallel needs the forward's length ({length}; x_t || x_0 doubles "
                             f"train.seq_len) divisible by parallel.tensor={tp_size}")
        return (comm.scatter(args[0], 1),) + tuple(args[1:])
    return hook


def _enter_tp_region(comm, sp: bool):
    """Pre-hook: the block's input x becomes the input of its column-parallel linears: identity forward with an
    all-reduce of the grad (no SP), or the sequence all-gather with a reduce-scatter of the grad (SP)."""
    def hook(module, args):
        x = comm.gather(args[0], 1, grad_is_partial=True) if sp else comm.copy_to(args[0])
        return (x,) + tuple(args[1:])
    return hook


class _MoETokenSplit:
    """Hooks on an MoE block under TP: split TP-replicated tokens before routing, gather the output, and combine
    the auxiliary loss / router statistics so they equal the unsplit ones."""

    def __init__(self, comm, tp_size: int, sequence_parallel: bool):
        self.comm, self.tp, self.sp, self.dim = comm, tp_size, sequence_parallel, None

    def pre(self, module, args):
        (x,) = args
        if not getattr(module, "_tp_post_hooked", False):
            module.register_forward_hook(self.post)
            module._tp_post_hooked = True
        if self.sp:  # already sequence shards
            self.dim = None
            return None
        b, l = x.shape[0], x.shape[1]
        if b % self.tp == 0:
            self.dim = 0  # whole sequences per rank: the sequence-level aux loss stays exact
        elif l % self.tp == 0:
            self.dim = 1
        else:
            raise ValueError(f"tensor parallel MoE needs batch ({b}) or sequence length ({l}) divisible by "
                             f"parallel.tensor={self.tp}")
        return (self.comm.scatter(x, self.dim),)

    def post(self, module, args, output):
        y, aux, stats = output
        if self.dim is not None:
            y = self.comm.gather(y, self.dim)
        # Mean over TP ranks in value; each rank's share of the gradient flows to its own router (summed over TP).
        aux = self.comm.reduce_from(aux / self.tp)
        load = stats.load.clone()
        dist.all_reduce(load, group=self.comm.group)
        ent = stats.entropy.clone()
        dist.all_reduce(ent, group=self.comm.group)
        stats = type(stats)(load=load, entropy=ent / self.tp)
        return y, aux, stats
