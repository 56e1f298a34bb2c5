"""The megatron-core engine: the project's LLaDA2MoE with megatron-core parallel groups, tensor-parallel mappings,
DistributedDataParallel (contiguous grad buffers) and the distributed optimizer (ZeRO-1 style AdamW, fp32 master).

Why not a megatron GPTModel: LLaDA2's router (sigmoid, expert bias, group-limited top-k, routed scaling), QK-norm,
partial RoPE and fused [q|k|v] weight would all have to be re-expressed through TransformerConfig knobs and specs —
a second model definition whose numerics must then be kept equal to ours. Instead megatron supplies what it is
best at (process groups with MoE parallel folding, TP region mappings, bucketed DP grad reduction, the sharded
optimizer and its grad-norm/clipping over the right groups) and the model stays the one definition.

Layout: parallel_state.initialize_model_parallel(tp, ep, etp, pp=1). Expert params carry `allreduce=False`, so
megatron DDP reduces them over the expert-data-parallel group with scale 1/DP and puts them in the expert optimizer;
TP shards carry `tensor_model_parallel`, so the grad norm counts them on every TP rank and replicated params once.
Params whose grads are partial over TP (router, shared expert, q/k norms, norms under SP) are summed over TP after
DDP's reduction (what finalize_model_grads does for megatron's own sequence-parallel norms).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from training import accelerator
from training.config_errors import ConfigError
from training.engines import megatron_cpu_compat as compat
from training.engines.base import Engine, MOMENTS
from training.engines.native import build_sharded_model
from training.engines.world import ParallelWorld, init_distributed


class MegatronTPComm:
    """The tensor_parallel.TorchTPComm contract on top of megatron-core's mappings (which work on dim 0)."""

    def __init__(self, group):
        from megatron.core.tensor_parallel import mappings
        self.m, self.group = mappings, group

    def copy_to(self, x):
        return self.m.copy_to_tensor_model_parallel_region(x, group=self.group)

    def reduce_from(self, x):
        return self.m.reduce_from_tensor_model_parallel_region(x, group=self.group)

    def scatter(self, x, dim):
        return self.m.scatter_to_sequence_parallel_region(x.movedim(dim, 0).contiguous(),
                                                          group=self.group).movedim(0, dim)

    def gather(self, x, dim, grad_is_partial=False):
        return self.m.gather_from_sequence_parallel_region(x.movedim(dim, 0).contiguous(),
                                                           tensor_parallel_output_grad=grad_is_partial,
                                                           group=self.group).movedim(0, dim)

    def reduce_scatter(self, x, dim):
        return self.m.reduce_scatter_to_sequence_parallel_region(x.movedim(dim, 0).contiguous(),
                                                                 group=self.group).movedim(0, dim)


def _megatron_world(cfg) -> ParallelWorld:
    par = cfg.parallel
    rank, world, device, backend = init_distributed(cfg.train.collective_timeout_s)
    if world == 1 and not dist.is_initialized():
        # megatron-core always needs a process group, also for one process.
        dist.init_process_group(accelerator.backend(), store=dist.HashStore(), rank=0,
                                world_size=1)
        backend = dist.get_backend()
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=par.tensor, pipeline_model_parallel_size=1,
                                     expert_model_parallel_size=par.expert,
                                     expert_tensor_parallel_size=par.expert_tensor,
                                     distributed_timeout_minutes=cfg.train.collective_timeout_s / 60)
    return ParallelWorld(
        rank=rank, world_size=world, device=device, backend=backend,
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(), etp_size=ps.get_expert_tensor_parallel_world_size(),
        edp_rank=ps.get_expert_data_parallel_rank(), edp_size=ps.get_expert_data_parallel_world_size(),
        sequence_parallel=par.sequence_parallel and par.tensor > 1,
        dp_group=ps.get_data_parallel_group(), tp_group=ps.get_tensor_model_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(), etp_group=ps.get_expert_tensor_parallel_group(),
        edp_group=ps.get_expert_data_parallel_group())


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg):
        super().__init__(cfg)
        par = cfg.parallel
        if par.pipeline != 1:
            raise ConfigError(f"parallel.pipeline={par.pipeline} is not allowed with train.engine=megatron: "
                              "must be 1 (not implemented for the LLaDA2 model yet)")
        compat.check_version()
        if accelerator.device_for(0).type == "cpu":
            compat.apply()  # (the GPU rehearsal's device pass stubs torch.cuda itself, keeping tensors on cuda)
        self.world = _megatron_world(cfg)
        model, self.specs = build_sharded_model(cfg, self.world, MegatronTPComm(self.world.tp_group))
        self._module = model
        bf16 = self._bf16_params()
        if bf16:  # the distributed optimizer keeps the fp32 main params; buffers (expert_bias) stay fp32
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)

        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer import TransformerConfig
        m = cfg.model
        tcfg = TransformerConfig(num_layers=m.num_hidden_layers, hidden_size=m.hidden_size,
                                 num_attention_heads=m.num_attention_heads,
                                 tensor_model_parallel_size=par.tensor, expert_model_parallel_size=par.expert,
                                 sequence_parallel=self.world.sequence_parallel, use_cpu_initialization=True,
                                 num_moe_experts=m.num_experts, moe_router_topk=m.num_experts_per_tok,
                                 expert_tensor_parallel_size=par.expert_tensor, add_bias_linear=m.use_bias,
                                 params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16)
        # fp32 grad buffers in both precisions: bf16 grads are accumulated over micro-batches and reduced in fp32
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                overlap_grad_reduce=self.overlap_grad_reduce(),
                                                use_distributed_optimizer=True, check_for_nan_in_grad=False)
        self.opt_cfg = OptimizerConfig(optimizer="adam", lr=cfg.train.lr, min_lr=cfg.train.min_lr,
                                       weight_decay=cfg.train.weight_decay, adam_beta1=cfg.train.betas[0],
                                       adam_beta2=cfg.train.betas[1], adam_eps=1e-8, clip_grad=cfg.train.grad_clip,
                                       use_distributed_optimizer=True, bf16=bf16, fp16=False)
        with compat.cpu_device_mode():
            self.model = DistributedDataParallel(tcfg, ddp_cfg, model)
            self.optimizer = get_megatron_optimizer(self.opt_cfg, [self.model])
        self._tp_partial = [p for n, p in model.named_parameters() if self.specs[n].tp_partial and p.requires_grad]

    def unwrap(self):
        return self._module

    def backward(self, loss: torch.Tensor, last_microbatch: bool = True) -> None:
        # megatron DDP hooks accumulate into the fp32 main_grad buffers; with overlap_grad_reduce a bucket's
        # reduce-scatter starts in the backward of the step's last micro-batch, as soon as its grads are final
        with contextlib.nullcontext() if last_microbatch else self.model.no_sync():
            loss.backward()

    @torch.no_grad()
    def _finalize_grads(self) -> None:
        with compat.cpu_device_mode():
            self.model.finish_grad_sync()
        if self.world.tp_size > 1 and self._tp_partial:
            grads = [p.main_grad for p in self._tp_partial]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.world.tp_group)
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()

    @torch.no_grad()
    def step(self, lr: float) -> dict:
        self._finalize_grads()
        wd = self.cfg.train.weight_decay
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = wd * g.get("wd_mult", 1.0)  # megatron's param scheduler normally sets this
        with compat.cpu_device_mode():
            self.optimizer.prepare_grads()
            norm = float(self.optimizer.get_grad_norm())
            skipped = not math.isfinite(norm)
            if not skipped:
                for opt in self.optimizer.chained_optimizers:
                    params = opt.get_parameters()
                    if params and self.cfg.train.grad_clip > 0:
                        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
                        clip_grad_by_total_norm_fp32(params, self.cfg.train.grad_clip, norm)
                self.optimizer.step_with_ready_grads()
            self.optimizer.zero_grad()
            self.model.zero_grad_buffer()
        return {"grad_norm": norm, "skipped": skipped}

    # ---- optimizer state in model space: each param's DP-sharded range (distributed optimizer) ----------------
    def _owning(self, param):
        """(optimizer, range of the flattened param held on this DP rank, or None): the dense or the expert
        DistributedOptimizer; a rank whose DP shard does not overlap the param holds none of it."""
        expert = not getattr(param, "allreduce", True)
        for opt in self.optimizer.chained_optimizers:
            if any(g.get("is_expert_parallel", False) == expert for g in opt.optimizer.param_groups):
                if param in opt.model_param_gbuf_map:
                    rng = opt._get_model_param_range_map(param)["param"]
                    return opt, (rng if rng.size > 0 else None)
                return opt, None
        raise KeyError("parameter not handled by any megatron optimizer")

    def _optim_entries(self):
        """Each rank writes the Adam moments of its own distributed-optimizer range, as boxes of the global tensor:
        no gather over data parallel (megatron's fully sharded model-space layout). Replicated params have the same
        ranges on every TP rank: TP rank 0 writes them."""
        from training.engines.sharding import range_entries
        entries = []
        for n, p in self.trainable():  # frozen weights (LoRA's base) are in no optimizer
            spec = self.specs[n]
            if spec.kind == "replicated" and self.world.tp_rank != 0:
                continue
            opt, rng = self._owning(p)
            if rng is None:
                continue
            st = opt._get_main_param_and_optimizer_states(p)
            keys = {f"optim.{k}/{n}": k for k in MOMENTS if k in st}
            if self._bf16_params():
                keys[n] = "param"  # the fp32 main param (the module holds bf16), in the same DP-sharded ranges
            for key, k in keys.items():
                entries += [(key, spec.global_shape, off, size, box)
                            for off, size, box in range_entries(spec, rng.start, st[k])]
        return entries

    def _iter_saved_tensors(self):
        """Under bf16 the trained params are written by `_optim_entries` from the fp32 main params instead."""
        skip = {n for n, p in self._module.named_parameters() if p.requires_grad} if self._bf16_params() else set()
        yield from ((n, t) for n, t in self._local_tensors().items() if n not in skip)

    @torch.no_grad()
    def _load_masters(self, reader) -> None:
        if not self._bf16_params():
            return
        for n, p in self._module.named_parameters():
            opt, rng = self._owning(p) if p.requires_grad else (None, None)
            if rng is not None:
                gi, go = opt.model_param_group_index_map[p]
                main = opt.optimizer.param_groups[gi]["params"][go]
                main.copy_(reader.read_local(n, self.specs[n], dtype=torch.float32).reshape(-1)[rng.start:rng.end])

    def _set_optim_state(self, states, step: int) -> None:
        if not states:
            return
        with compat.cpu_device_mode():
            for opt in self.optimizer.chained_optimizers:
                if not opt.optimizer.state:
                    # megatron creates the AdamW state with a zero-grad step; with lr=0 so that weight decay
                    # cannot touch the just-loaded weights (fp32 main params alias the model params).
                    saved = [(g["lr"], g["weight_decay"]) for g in opt.optimizer.param_groups]
                    for g in opt.optimizer.param_groups:
                        g["lr"], g["weight_decay"] = 0.0, 0.0
                    opt._init_optimizer_states_with_dummy_values()
                    for g, (lr, wd) in zip(opt.optimizer.param_groups, saved):
                        g["lr"], g["weight_decay"] = lr, wd
        for n, p in self.trainable():
            opt, rng = self._owning(p)
            if rng is None:
                continue
            st = opt._get_main_param_and_optimizer_states(p)
            new = {"param": p.detach().reshape(-1)[rng.start:rng.end]}
            for k in MOMENTS:
                new[k] = states[n][k].reshape(-1)[rng.start:rng.end]
            if "step" in st:
                new["step"] = torch.full_like(st["step"], float(step)) if torch.is_tensor(st["step"]) else step
            opt._set_main_param_and_optimizer_states(p, new)

    def _optim_step(self) -> int:
        for opt in self.optimizer.chained_optimizers:
            for st in opt.optimizer.state.values():
                if "step" in st:
                    return int(st["step"])
        return 0

    def _after_load_params(self) -> None:
        with compat.cpu_device_mode():
            self.optimizer.reload_model_params()
