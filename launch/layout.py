"""The rank layout of a launch (nodes x ranks per node) checked against the config's parallel layout and batch,
before anything is started or submitted — a 64-GPU job that would die at step 0 fails here in a second instead."""
from __future__ import annotations

from training.config import ConfigError


def check_world(cfg, nodes: int, ranks_per_node: int, gpus_per_node: int = 0, train_batch: bool = True) -> int:
    """Raise ConfigError naming the flag/key to change when `nodes x ranks_per_node` ranks cannot all work on
    this config; return the data-parallel size. `train_batch`: also check the backbone's train batch (for `train`)."""
    p, t = cfg.parallel, cfg.train
    world = nodes * ranks_per_node
    where = f"{nodes} node(s) x {ranks_per_node} rank(s) = {world} ranks"
    if gpus_per_node and ranks_per_node != gpus_per_node:
        raise ConfigError(f"--gpus-per-node={gpus_per_node} with {ranks_per_node} ranks per node: one rank drives "
                          f"one GPU, so set --nproc {gpus_per_node} (or leave it at 0)")
    if nodes > 1 and p.tensor > ranks_per_node:
        raise ConfigError(f"parallel.tensor={p.tensor} is larger than the {ranks_per_node} ranks per node: tensor-"
                          f"parallel groups must stay inside a node (they all-reduce every layer); lower "
                          f"parallel.tensor or raise --gpus-per-node")
    try:
        dp = p.data_parallel(world)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}; choose --nodes/--gpus-per-node so the world size is a multiple of "
                          f"parallel.tensor x parallel.pipeline = {p.tensor * p.pipeline} and of parallel.expert x "
                          f"parallel.expert_tensor = {p.expert * p.expert_tensor}") from None
    per_step = t.micro_batch_size * dp
    if train_batch and t.global_batch_size % per_step:
        usable = t.global_batch_size // t.micro_batch_size
        raise ConfigError(f"{where} gives {dp} data-parallel ranks, but train.global_batch_size="
                          f"{t.global_batch_size} is not a multiple of train.micro_batch_size x data-parallel = "
                          f"{t.micro_batch_size} x {dp}: the data-parallel size must divide global / micro = {usable}, "
                          f"so at most {usable} data-parallel ranks can be used; ask for fewer GPUs or raise "
                          f"train.global_batch_size")
    return dp
