"""The parallel world: ranks, sizes and process groups, created once and passed around (never read from globals).

Rank layout (the same for every engine, and the same as megatron-core's default order "tp-cp-ep-dp-pp" for both
grids, so "MoE parallel folding" holds: the expert grid is laid out independently of the dense one):
    dense grid   rank = dp_rank * tp + tp_rank                              (tensor parallel ranks are neighbours)
    expert grid  rank = edp_rank * (ep * etp) + ep_rank * etp + etp_rank    (expert-tensor ranks are neighbours)
An expert-parallel group may therefore overlap a tensor-parallel group (TP=2 x EP=2 on 4 ranks: both are {0,1} and
{2,3}); the MoE layer splits the TP-replicated tokens between TP ranks before dispatch (see tensor_parallel.py).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from training import accelerator
from training.config_errors import ConfigError


@dataclass
class ParallelWorld:
    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    etp_rank: int = 0  # expert-tensor-parallel: each expert's intermediate dim split over these ranks
    etp_size: int = 1
    edp_rank: int = 0  # expert-data-parallel: replicas of the same expert shard
    edp_size: int = 1
    sequence_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"  # gloo | nccl | none (single process)
    dp_group: Any = None
    tp_group: Any = None
    ep_group: Any = None
    etp_group: Any = None
    edp_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self) -> str:
        return (f"world={self.world_size} dp={self.dp_size} tp={self.tp_size}{'+sp' if self.sequence_parallel else ''}"
                f" ep={self.ep_size}{f' etp={self.etp_size}' if self.etp_size > 1 else ''} edp={self.edp_size} backend={self.backend} device={self.device}")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, torch.device, str]:
    """Initialise torch.distributed from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK) when WORLD_SIZE > 1: nccl on CUDA, gloo on CPU (training/accelerator.py decides). A process group
    that already exists (the rehearsal's fake one, a test's) is used as it is. Returns (rank, world, device, backend)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = accelerator.device_for(local_rank)
    accelerator.set_device(device)
    if world <= 1 and not dist.is_initialized():
        return 0, 1, device, "none"
    if not dist.is_initialized():
        backend = accelerator.backend()
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if backend == "nccl" else None)
    return dist.get_rank(), dist.get_world_size(), device, dist.get_backend()


def layout_groups(world_size: int, tp: int, ep: int, etp: int = 1):
    """Rank lists of every group in the layout above: (dp, tp, ep, etp, edp) lists of lists. Pure, for tests too."""
    if world_size % tp:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tensor={tp}")
    if world_size % (ep * etp):
        raise ValueError(f"world size {world_size} is not divisible by parallel.expert x parallel.expert_tensor="
                         f"{ep * etp}")
    dp, grid = world_size // tp, ep * etp
    tp_groups = [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]
    dp_groups = [list(range(t, world_size, tp)) for t in range(tp)]
    blocks = range(0, world_size, grid)  # one block of ep x etp ranks per expert-data-parallel replica
    ep_groups = [[b + e * etp + j for e in range(ep)] for b in blocks for j in range(etp)]
    etp_groups = [[b + e * etp + j for j in range(etp)] for b in blocks for e in range(ep)]
    edp_groups = [list(range(r, world_size, grid)) for r in range(grid)]
    return dp_groups, tp_groups, ep_groups, etp_groups, edp_groups


def build_world(tp: int, ep: int, sequence_parallel: bool = False, timeout_s: int = 1800,
                etp: int = 1) -> ParallelWorld:
    """Torch-native groups for the native and deepspeed engines (megatron builds its own through parallel_state)."""
    rank, world, device, backend = init_distributed(timeout_s)
    dp_groups, tp_groups, ep_groups, etp_groups, edp_groups = layout_groups(world, tp, ep, etp)
    w = ParallelWorld(rank=rank, world_size=world, tp_size=tp, ep_size=ep, etp_size=etp, dp_size=world // tp,
                      edp_size=world // (ep * etp), sequence_parallel=sequence_parallel and tp > 1, device=device,
                      backend=backend)
    w.tp_rank, w.dp_rank = rank % tp, rank // tp
    w.etp_rank, w.ep_rank, w.edp_rank = rank % etp, rank // etp % ep, rank // (ep * etp)
    if world > 1:
        # new_group is collective over the whole world: every rank creates every group, keeps its own. A group
        # made without a timeout gets torch's default (30 min), not the default group's: pass it to each.
        timeout = datetime.timedelta(seconds=timeout_s)
        for name, lists in (("dp_group", dp_groups), ("tp_group", tp_groups), ("ep_group", ep_groups),
                            ("etp_group", etp_groups), ("edp_group", edp_groups)):
            for ranks in lists:
                g = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    setattr(w, name, g)
    return w


def set_group_timeouts(groups, timeout_s: int) -> None:
    """The timeout of groups made by a library that takes none (DeepSpeed's expert groups get torch's 30 min)."""
    for g in {id(g): g for g in groups if g is not None}.values():
        dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), g)


def check_layout(cfg, world_size: int, nodes: int = 1, gpus_per_node: int = 0, train_batch: bool = True) -> int:
    """The one check of the world / parallel-layout / batch rules, called by the launchers (`launch local|slurm`,
    `plan`) before anything starts and by the engines at build: a 64-GPU job that would die at step 0 fails in a
    second, naming the flag or key to change. Returns the data-parallel size. `train_batch`: also the backbone's
    batch rule (for `train`)."""
    p = cfg.parallel
    per_node = world_size // max(nodes, 1)
    where = f"{nodes} node(s) x {per_node} rank(s) = {world_size} ranks"
    if gpus_per_node and per_node != gpus_per_node:
        raise ConfigError(f"--gpus-per-node={gpus_per_node} with {per_node} ranks per node: one rank drives "
                          f"one GPU, so set --nproc {gpus_per_node} (or leave it at 0)")
    if nodes > 1 and p.tensor > per_node:
        raise ConfigError(f"parallel.tensor={p.tensor} is larger than the {per_node} ranks per node: tensor-"
                          f"parallel groups must stay inside a node (they all-reduce every layer); lower "
                          f"parallel.tensor or raise --gpus-per-node")
    try:
        dp = p.data_parallel(world_size)  # raises ConfigError naming tensor/pipeline/expert
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}; choose --nodes/--gpus-per-node so the world size is a multiple of "
                          f"parallel.tensor x parallel.pipeline = {p.tensor * p.pipeline} and of parallel.expert x "
                          f"parallel.expert_tensor = {p.expert * p.expert_tensor}") from None
    if world_size % p.expert:
        raise ConfigError(f"parallel.expert={p.expert} is not allowed with {world_size} ranks: must divide the "
                          "world size")
    if train_batch:
        accum_steps(cfg, dp, where)
    return dp


def accum_steps(cfg, dp: int, where: str = "") -> int:
    """Micro-batches per optimizer step on each rank: global batch / (micro batch x DP), which must divide."""
    t = cfg.train
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        usable = t.global_batch_size // t.micro_batch_size
        raise ConfigError(f"{where + ' gives ' if where else ''}{dp} data-parallel ranks, but train.global_batch_size="
                          f"{t.global_batch_size} is not a multiple of train.micro_batch_size x data-parallel = "
                          f"{t.micro_batch_size} x {dp}: the data-parallel size must divide global / micro = {usable}, "
                          f"so at most {usable} data-parallel ranks can be used; ask for fewer GPUs or raise "
                          f"train.global_batch_size")
    return t.global_batch_size // per_step