"""Where each local parameter sits inside the full (unsharded) parameter of the same name.

Every engine describes its layout with one `ShardSpec` per parameter/buffer of the unwrapped `LLaDA2MoE`. The spec
is the single source of truth for: initialising a shard exactly as a single process would (`init_local`), slicing a
full state dict (`load_full`), writing/reading reshardable checkpoints (`shard_format`), gathering the full state dict,
and counting each gradient element once in the global grad norm (`owner`).

A local tensor is a concatenation, along one dim, of `pieces` of the global tensor; one piece for an ordinary
row/column/expert shard, three for the fused `query_key_value` ([q | k | v] rows of this rank's heads). Experts under
expert-tensor parallelism are also cut along a second dim (`sub`: one contiguous range of the intermediate dim), so
their local tensor is a 2-D box of the global one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ShardSpec:
    global_shape: tuple[int, ...]
    dim: int = 0
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (local_start, global_start, length) on dim
    kind: str = "replicated"  # replicated | tp (split over the TP group) | expert (split over EP and ETP)
    tp_partial: bool = False  # grad is a partial sum over TP ranks (token split, head split, sequence parallel)
    owner: bool = True  # this rank is the one replica that writes it / counts it in the grad norm
    sub: tuple[int, int, int] | None = None  # (dim, global_start, length): a range on a second dim (ETP experts)

    @classmethod
    def replicated(cls, shape) -> "ShardSpec":
        shape = tuple(shape)
        return cls(global_shape=shape, dim=0, pieces=[(0, 0, shape[0] if shape else 1)])

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.global_shape)
        if shape:
            shape[self.dim] = sum(p[2] for p in self.pieces)
        if self.sub is not None:
            shape[self.sub[0]] = self.sub[2]
        return tuple(shape)

    @property
    def is_full(self) -> bool:
        return self.local_shape == self.global_shape

    def boxes(self):
        """Yield (local_slices, global_offsets, sizes): an N-d box per piece."""
        nd = len(self.global_shape)
        for local_start, global_start, length in self.pieces:
            if nd == 0:
                yield (), (), ()
                continue
            offsets = [0] * nd
            sizes = list(self.global_shape)
            offsets[self.dim], sizes[self.dim] = global_start, length
            local = [slice(None)] * nd
            local[self.dim] = slice(local_start, local_start + length)
            if self.sub is not None:
                d, start, n = self.sub
                offsets[d], sizes[d] = start, n
            yield tuple(local), tuple(offsets), tuple(sizes)

    def slice_full(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a full tensor."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"full tensor has shape {tuple(full.shape)}, expected {self.global_shape}")
        if self.is_full:
            return full
        if self.sub is not None:
            full = full.narrow(self.sub[0], self.sub[1], self.sub[2])
        return torch.cat([full.narrow(self.dim, g, n) for _, g, n in self.pieces], dim=self.dim)


def flat_range_boxes(shape, start: int, end: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Cover elements [start, end) of a C-contiguous tensor of `shape` (flat order) with boxes (offsets, sizes),
    returned in flat order; each box is itself a contiguous run of that range (at most 2 x ndim - 1 boxes)."""
    shape = tuple(shape)
    if start >= end:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    (r0, c0), (r1, c1) = divmod(start, inner), divmod(end, inner)
    rest = (0,) * (len(shape) - 1)
    row = lambda r, lo, hi: [((r,) + o, (1,) + z) for o, z in flat_range_boxes(shape[1:], lo, hi)]
    if r0 == r1:  # inside one row
        return row(r0, c0, c1)
    out = []
    if c0:  # the partial first row
        out += row(r0, c0, inner)
        r0 += 1
    if r1 > r0:  # whole rows
        out.append(((r0,) + rest, (r1 - r0,) + shape[1:]))
    if c1:  # the partial last row
        out += row(r1, 0, c1)
    return out


def range_entries(spec: ShardSpec, start: int, data: torch.Tensor):
    """Global boxes of a flat range of the *local* tensor (e.g. a distributed optimizer's slice of a param's Adam
    moment): yields (global_offsets, sizes, values) with values of shape `sizes`, so a rank can write the part it
    holds without gathering the whole tensor."""
    local_shape, data = spec.local_shape, data.reshape(-1)
    used = 0
    for offsets, sizes in flat_range_boxes(local_shape, start, start + data.numel()):
        n = math.prod(sizes)
        box = data[used:used + n].view(sizes)
        used += n
        if not local_shape:
            yield (), (), box
            continue
        d = spec.dim
        for local_start, global_start, length in spec.pieces:  # a box may straddle pieces (e.g. q | k | v)
            lo, hi = max(offsets[d], local_start), min(offsets[d] + sizes[d], local_start + length)
            if lo >= hi:
                continue
            g_off, g_size = list(offsets), list(sizes)
            g_off[d], g_size[d] = global_start + lo - local_start, hi - lo
            if spec.sub is not None:
                g_off[spec.sub[0]] += spec.sub[1]
            yield tuple(g_off), tuple(g_size), box.narrow(d, lo - offsets[d], hi - lo)


def default_specs(model: torch.nn.Module) -> dict[str, ShardSpec]:
    """Every parameter and persistent buffer replicated (single process / pure data parallel)."""
    specs = {name: ShardSpec.replicated(p.shape) for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        specs[name] = ShardSpec.replicated(b.shape)
    return specs


def assign_owners(specs: dict[str, ShardSpec], world) -> None:
    """Exactly one rank owns each distinct piece: replicated -> rank 0; tp -> dp_rank 0 of each TP rank;
    expert -> edp_rank 0 of each (EP, ETP) rank."""
    for spec in specs.values():
        if spec.kind == "tp":
            spec.owner = world.dp_rank == 0
        elif spec.kind == "expert":
            spec.owner = world.edp_rank == 0
        else:
            spec.owner = world.rank == 0


def mark_params(model: torch.nn.Module, specs: dict[str, ShardSpec]) -> None:
    """Attributes the engines' grad reduction reads (the megatron-core names, so megatron DDP/optimizer agree):
    `allreduce=False` on expert params (reduced over expert-data-parallel), `tensor_model_parallel` on TP shards
    and experts (never a TP duplicate: the grad norm counts them on every TP rank, as megatron's own expert
    linears), and our `tp_partial` (summed over the TP group)."""
    for name, p in model.named_parameters():
        spec = specs[name]
        if spec.kind == "expert":
            p.allreduce = False
        if spec.kind in ("tp", "expert"):
            p.tensor_model_parallel = True
            p.partition_dim = spec.dim
            p.partition_stride = 1
        p.tp_partial = spec.tp_partial


@torch.no_grad()
def init_local(model, specs: dict[str, ShardSpec], seed: int) -> None:
    """Materialised (possibly sharded) params get exactly the values a single process would give them: the full
    initial tensor of each parameter depends only on (seed, name); we keep our slice (one full tensor at a time)."""
    for name, p in model.named_parameters():
        p.copy_(specs[name].slice_full(model.init_tensor(name, specs[name].global_shape, seed)))
    for name, b in model.named_buffers():
        b.zero_()


@torch.no_grad()
def load_full(own: dict[str, torch.Tensor], specs: dict[str, ShardSpec], full: dict[str, torch.Tensor],
              strict: bool = True) -> None:
    """Copy this rank's slices out of a full state dict in the model's own names into `own` (the engine's
    `_local_tensors`: params and buffers, or the fp32 masters of the params)."""
    missing = [n for n in own if n not in full]
    unexpected = [n for n in full if n not in own]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in own.items():
        if name in full:
            t.copy_(specs[name].slice_full(full[name].to(t.device)))
