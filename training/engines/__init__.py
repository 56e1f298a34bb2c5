"""Training engines: one LLaDA2MoE definition, three ways to run it in parallel.

    native     torch only: DP (grad all-reduce), TP/SP, EP (all-to-all)            training/engines/native.py
    megatron   megatron-core parallel_state, mappings, DDP + distributed optimizer  training/engines/megatron.py
    deepspeed  deepspeed.initialize with ZeRO 0-2 (DP group), TP/SP and EP          training/engines/deepspeed.py

All engines share the trainer contract (`Engine` in base.py) and the reshardable checkpoint format
(shard_format.py), so a checkpoint written by any engine under any layout loads into any other.
"""
from __future__ import annotations

import os

import torch

from training.config_errors import ConfigError
from training.engines.base import Engine
from training.engines.world import ParallelWorld, check_layout


def build_engine(cfg, model: torch.nn.Module | None = None) -> Engine:
    """Initialise torch.distributed from the torchrun environment if WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)
    and build the engine named by cfg.train.engine over the LLaDA2MoE of cfg.model, sharded for cfg.parallel; or,
    with `model`, over that ready module, trained data parallel only (the decoder stages)."""
    check_layout(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    engine = cfg.train.engine
    if engine == "native":
        from training.engines.native import NativeEngine
        return NativeEngine(cfg, model=model)
    if engine == "megatron":
        if model is not None:
            raise ConfigError("train.engine=megatron builds its own LLaDA2MoE: a ready module (the decoder "
                              "stages) runs on native | deepspeed")
        from training.engines.megatron import MegatronEngine
        return MegatronEngine(cfg)
    if engine == "deepspeed":
        from training.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, model=model)
    raise ConfigError(f"train.engine={engine} is not allowed: must be native | megatron | deepspeed")


__all__ = ["Engine", "ParallelWorld", "build_engine"]
