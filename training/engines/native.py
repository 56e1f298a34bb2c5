"""The torch-only engine: single process, data parallel (grad all-reduce), tensor/sequence parallel and expert
parallel (all-to-all) over torch process groups; torch AdamW on fp32 master weights: the params themselves under
train.precision=fp32, fp32 copies of bf16 params under bf16 (`master.py`).

train.overlap_grad_reduce does not apply here: the gradient all-reduces run once per step, after the last backward
(coalesced per group); megatron and DeepSpeed overlap them with the backward.

Gradient reduction after backward, per parameter kind (derivation in docs/engines.md):
    tp_partial (router, shared expert, q/k norms; norms with SP)   sum over the TP group
    dense and TP shards                                            mean over the DP group
    routed experts (one owner per EP x ETP block)                  sum over the expert-DP group, / DP size
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from training.config_errors import ConfigError
from training.engines.base import Engine, MOMENTS, no_decay
from training.engines.expert_parallel import shard_experts
from training.engines.lora import apply_lora
from training.engines.master import MasterWeights
from training.engines.sharding import assign_owners, default_specs, init_local, mark_params
from training.engines.tensor_parallel import TorchTPComm, apply_tensor_parallel
from training.engines.world import ParallelWorld, build_world
from training.model import build_model


def build_sharded_model(cfg, world: ParallelWorld, tp_comm=None):
    """Meta-build the one LLaDA2MoE, shard it for `world` (TP, EP), materialise only the local shards and initialise
    them to exactly the single-process values. Returns (model, specs)."""
    model = build_model(cfg.model, "meta")
    specs = default_specs(model)
    if world.tp_size > 1:
        apply_tensor_parallel(model, specs, world.tp_rank, world.tp_size, tp_comm or TorchTPComm(world.tp_group),
                              world.sequence_parallel)
    shard_experts(model, specs, world)
    apply_lora(model, specs, cfg.model.lora)  # model.lora: base frozen, adapters sharded like their base
    model.to_empty(device=world.device)
    init_local(model, specs, cfg.train.seed)
    assign_owners(specs, world)
    mark_params(model, specs)
    return model, specs


def replicated_model(model: torch.nn.Module, world: ParallelWorld):
    """A ready module trained data parallel only (the decoder stages): every tensor replicated, on the rank's
    device, rank 0's values broadcast so every replica starts equal. Returns (model, specs)."""
    if world.tp_size * world.ep_size * world.etp_size > 1:
        raise ConfigError("a ready module (the decoder stages) runs data parallel only: parallel.tensor, "
                          "parallel.expert and parallel.expert_tensor must be 1")
    if any(t.device != world.device for t in model.state_dict().values()):
        model.to(world.device)
    specs = default_specs(model)
    assign_owners(specs, world)
    mark_params(model, specs)
    if world.world_size > 1:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
    return model, specs


def param_groups(model, cfg) -> list[dict]:
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:  # frozen weights (a frozen encoder, LoRA's base) get no optimizer state
            (plain if no_decay(n, p) else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": plain, "weight_decay": 0.0}]


class NativeEngine(Engine):
    name = "native"

    def __init__(self, cfg, world: ParallelWorld | None = None, model: torch.nn.Module | None = None):
        super().__init__(cfg)
        par = cfg.parallel
        if par.pipeline != 1:
            raise ConfigError(f"parallel.pipeline={par.pipeline} is not allowed with train.engine={self.name}: "
                              "must be 1 (not implemented)")
        self.world = world or build_world(par.tensor, par.expert, par.sequence_parallel,
                                          timeout_s=cfg.train.collective_timeout_s, etp=par.expert_tensor)
        self.model, self.specs = (build_sharded_model(cfg, self.world) if model is None
                                  else replicated_model(model, self.world))
        self.master = MasterWeights(self.model) if cfg.train.precision == "bf16" else None
        # the tensors the optimizer steps and whose .grad is reduced: fp32 masters, or the fp32 params themselves
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.params = {n: self.master.of[p] for n, p in named.items()} if self.master else named
        groups = param_groups(self.model, cfg)
        if self.master:
            groups = [{**g, "params": [self.master.of[p] for p in g["params"]]} for g in groups]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr,
                                           betas=tuple(cfg.train.betas), eps=1e-8)

    def unwrap(self):
        return self.model

    def backward(self, loss: torch.Tensor, last_microbatch: bool = True) -> None:
        loss.backward()

    @torch.no_grad()
    def _reduce_grads(self) -> None:
        w = self.world
        buckets = {"tp": [], "dp": [], "edp": []}
        for n, p in self.params.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            spec = self.specs[n]
            if spec.tp_partial and w.tp_size > 1:
                buckets["tp"].append(p.grad)
            buckets["edp" if spec.kind == "expert" else "dp"].append(p.grad)
        _coalesced_all_reduce(buckets["tp"], w.tp_group, w.tp_size > 1, 1.0)
        _coalesced_all_reduce(buckets["dp"], w.dp_group, w.dp_size > 1, 1.0 / w.dp_size)
        _coalesced_all_reduce(buckets["edp"], w.edp_group, w.edp_size > 1, 1.0 / w.dp_size)
        if w.edp_size == 1 and w.dp_size > 1:  # experts still need the 1/DP of the mean over data-parallel ranks
            for g in buckets["edp"]:
                g.mul_(1.0 / w.dp_size)

    @torch.no_grad()
    def grad_norm(self) -> float:
        """Global L2 norm: each distinct gradient element counted once (by its owner), summed over the world."""
        sq = torch.zeros((), dtype=torch.float64, device=self.world.device)
        for n, p in self.params.items():
            if self.specs[n].owner and p.grad is not None:
                sq += p.grad.double().pow(2).sum()
        if self.world.world_size > 1:
            dist.all_reduce(sq)
        sq = sq.item()  # the step's one host sync: the skip / clip decision needs the value
        return math.sqrt(sq) if math.isfinite(sq) else float("nan")

    @torch.no_grad()
    def step(self, lr: float) -> dict:
        self._reduce_grads()
        norm = self.grad_norm()
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return {"grad_norm": norm, "skipped": True}
        clip = self.cfg.train.grad_clip
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)
            for p in self.params.values():
                p.grad.mul_(coef)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            self.master.copy_back()
        return {"grad_norm": norm, "skipped": False}

    # ---- optimizer state in model space ---------------------------------------------------------------------
    def _local_tensors(self):
        """Params as the optimizer holds them (the fp32 masters under bf16): checkpoints store and load those."""
        return {**dict(self.model.named_parameters()), **self.params, **dict(self.model.named_buffers())}

    def _after_load_params(self) -> None:
        if self.master:
            self.master.copy_back()

    def _get_optim_state(self):
        out = {}
        for n, p in self.params.items():
            st = self.optimizer.state.get(p, {})
            if "exp_avg" in st:
                out[n] = {k: st[k] for k in MOMENTS}
        return out

    def _set_optim_state(self, states, step: int) -> None:
        for n, p in self.params.items():
            if n in states:
                self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                           **{k: v.to(p.device, torch.float32).clone() for k, v in states[n].items()}}

    def _optim_step(self) -> int:
        for st in self.optimizer.state.values():
            if "step" in st:
                return int(st["step"])
        return 0


def _coalesced_all_reduce(grads, group, active: bool, scale: float) -> None:
    if not grads or not active:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if scale != 1.0:
        flat.mul_(scale)
    dist.all_reduce(flat, group=group)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()
