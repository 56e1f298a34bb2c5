"""The DeepSpeed engine: deepspeed.initialize with ZeRO 0/1/2 around the one
LLaDA2MoE, expert parallelism on DeepSpeed's expert-parallel group with the project's all-to-all dispatcher.

CPU (research note section 4): DS_ACCELERATOR=cpu, the shared-memory comm op is stubbed before init (it would JIT
compile for ~60 s), and the optimizer is a client torch AdamW, so nothing is ever JIT-compiled.

Expert parameters are marked the DeepSpeed way (`allreduce=False`, `group_name="ep_size_<ep>"`, optimizer param
groups split with `split_params_into_different_moe_groups_for_optimizer`), so ZeRO partitions and reduces them over
the expert-data-parallel group. DeepSpeed only recognises its own `deepspeed.moe.layer.MoE` as an MoE module; while
`deepspeed.initialize` runs, the engine module's `MoE` name is widened to (its MoE, our MoE) so `has_moe_layers` is
set and the expert groups are wired into ZeRO (restored right after).

Tensor (+sequence) parallelism is the project's own (`tensor_parallel.py`, the same specs and checkpoint format as
native/megatron), on the torch groups of `world.build_world`; DeepSpeed is handed an `mpu` (`_WorldMpu`) so its data
parallelism and ZeRO partitions span the data-parallel group only, its grad norm counts TP shards and experts
(`tensor_model_parallel`) on every TP rank and replicated params on TP rank 0, and the project's expert groups are
registered in `deepspeed.utils.groups` under `ep_size_<ep>` (DeepSpeed's own E+M+D layout differs from ours).
Grads that are partial over TP (`tp_partial`: router, shared expert, q/k norms, norms under SP) are summed over the
TP group by a tensor hook, before ZeRO's gradient hooks see them.

Gradient accumulation is owned by the caller (`managed_gradient_accumulation: false`): backward() accumulates
locally, step() reduces, clips and updates, exactly the trainer contract.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys

import torch
import torch.distributed as dist

from training.config_errors import ConfigError
from training.engines.base import Engine, MOMENTS, no_decay
from training.engines.native import build_sharded_model, replicated_model
from training.engines.tensor_parallel import _all_reduce
from training.engines.world import ParallelWorld, build_world, init_distributed, layout_groups, set_group_timeouts
from training import accelerator


def _prepare_cpu() -> None:
    if not accelerator.cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # `import deepspeed.comm.torch as m` returns the torch package (name shadowing): patch via sys.modules.
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


@contextlib.contextmanager
def _project_moe_is_deepspeed_moe():
    import deepspeed.runtime.engine as ds_engine
    from training.model.moe import MoE
    original = ds_engine.MoE
    ds_engine.MoE = (original, MoE)
    try:
        yield
    finally:
        ds_engine.MoE = original


class _WorldMpu:
    """The megatron-style `mpu` DeepSpeed reads (data / model = tensor parallel groups) over a ParallelWorld."""

    def __init__(self, world: ParallelWorld):
        self.w = world

    def get_data_parallel_group(self):
        return self.w.dp_group

    def get_data_parallel_world_size(self):
        return self.w.dp_size

    def get_data_parallel_rank(self):
        return self.w.dp_rank

    def get_model_parallel_group(self):
        return self.w.tp_group

    get_tensor_model_parallel_group = get_model_parallel_group

    def get_model_parallel_world_size(self):
        return self.w.tp_size

    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_model_parallel_rank(self):
        return self.w.tp_rank

    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.w.rank - self.w.tp_rank

    def get_pipeline_model_parallel_world_size(self):
        return 1


def _register_expert_groups(world: ParallelWorld, group_name: str) -> None:
    """Our expert / expert-data-parallel groups (world.py layout) as DeepSpeed's groups of `group_name`."""
    from deepspeed.utils import groups
    _, _, ep_lists, _, edp_lists = layout_groups(world.world_size, world.tp_size, world.ep_size)
    groups._EXPERT_PARALLEL_GROUP[group_name] = world.ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[group_name] = next(r for r in ep_lists if world.rank in r)
    groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = world.edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[group_name] = next(r for r in edp_lists if world.rank in r)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, cfg, model: torch.nn.Module | None = None):
        super().__init__(cfg)
        par = cfg.parallel
        for key in ("expert_tensor", "pipeline"):
            if getattr(par, key) != 1:
                raise ConfigError(f"parallel.{key}={getattr(par, key)} is not allowed with train.engine=deepspeed: "
                                  "must be 1 (not implemented; expert_tensor > 1 runs on train.engine=megatron "
                                  "or native)")
        if par.zero_stage == 3:
            # DeepSpeed asserts its MoE out of ZeRO-3, and without experts sharded ZeRO-3 params would need
            # GatheredParameters around save/load/full_state_dict, which this engine does not do yet.
            raise ConfigError(f"parallel.zero_stage=3 is not allowed with train.engine=deepspeed (parallel.expert="
                              f"{par.expert}): use zero_stage 0, 1 or 2")
        bf16 = self._bf16_params()
        if bf16 and par.zero_stage != 2:
            # ZeRO-0: DeepSpeed has no bf16 params + fp32 gradient accumulation (NotImplementedError in its optimizer
            # check). ZeRO-1: its BF16_Optimizer under managed_gradient_accumulation=false mis-accumulates the
            # micro-batches (measured on the tiny preset, 2 micro-batches: grad norm 2.94 instead of 1.82).
            raise ConfigError(f"parallel.zero_stage={par.zero_stage} is not allowed with train.engine=deepspeed and "
                              "train.precision=bf16: use zero_stage 2 (fp32 masters, fp32 gradient accumulation), "
                              "or train.precision=fp32")
        explicit = str(cfg.train.overlap_grad_reduce).lower() != "auto"
        overlap = self.overlap_grad_reduce() and (par.zero_stage == 2 or explicit)
        if overlap and par.zero_stage != 2:
            raise ConfigError(f"train.overlap_grad_reduce=true is not allowed with train.engine=deepspeed and "
                              f"parallel.zero_stage={par.zero_stage}: DeepSpeed overlaps the gradient reduction "
                              "(overlap_comm) only under ZeRO-2 here; use zero_stage 2 or overlap_grad_reduce=auto")
        _prepare_cpu()
        import deepspeed
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        from deepspeed.utils import groups

        timeout_s = cfg.train.collective_timeout_s
        rank, world, device, backend = init_distributed(timeout_s)
        os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed asserts it, also for a plain single process
        if world == 1 and not dist.is_initialized():
            dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                    world_size=1)
            backend = dist.get_backend()
        deepspeed.init_distributed(dist_backend=backend)
        ep = par.expert
        self.group_name = f"ep_size_{ep}"
        mpu = None
        if par.tensor > 1:
            self.world = build_world(par.tensor, ep, par.sequence_parallel, timeout_s=timeout_s)
            mpu = _WorldMpu(self.world)
            _register_expert_groups(self.world, self.group_name)
        elif self.group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep)
        if mpu is None:
            self.world = ParallelWorld(
                rank=rank, world_size=world, device=device, backend=backend, dp_rank=rank, dp_size=world,
                ep_rank=groups._get_expert_parallel_rank(self.group_name), ep_size=ep,
                edp_rank=dist.get_rank(groups._get_expert_data_parallel_group(self.group_name)),
                edp_size=groups._get_expert_data_parallel_world_size(self.group_name),
                dp_group=groups._get_data_parallel_group(), ep_group=groups._get_expert_parallel_group(self.group_name),
                edp_group=groups._get_expert_data_parallel_group(self.group_name))
            if world > 1:
                set_group_timeouts([self.world.dp_group, self.world.ep_group, self.world.edp_group], timeout_s)
        model, self.specs = (build_sharded_model(cfg, self.world) if model is None
                             else replicated_model(model, self.world))
        self._module = model
        if self.world.tp_size > 1:
            tp_group = self.world.tp_group
            for n, p in model.named_parameters():
                if self.specs[n].tp_partial and p.requires_grad:  # runs before ZeRO's grad-accumulation hooks
                    p.register_hook(lambda g, grp=tp_group: _all_reduce(g, grp))
        for n, p in model.named_parameters():
            if self.specs[n].kind == "expert":
                # ZeRO reduces these over the expert-data-parallel group, pre-divided by the full DP size: the
                # sum over EP (all-to-all backward) and EDP over DP equals the mean over DP ranks (measured exact).
                p.group_name = self.group_name
        t = cfg.train
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups_ = [{"params": [p for n, p in trainable if not no_decay(n, p)],
                    "weight_decay": t.weight_decay, "name": "decay"},
                   {"params": [p for n, p in trainable if no_decay(n, p)],
                    "weight_decay": 0.0, "name": "no_decay"}]
        groups_ = split_params_into_different_moe_groups_for_optimizer(groups_)
        optimizer = torch.optim.AdamW(groups_, lr=t.lr, betas=tuple(t.betas), eps=1e-8)
        accum = self.global_batch_accum()
        ds_config = {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "train_batch_size": t.micro_batch_size * accum * self.world.dp_size,
            "managed_gradient_accumulation": False,
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": par.zero_stage, "overlap_comm": overlap, "contiguous_gradients": True,
                                  "reduce_scatter": True},
            # bf16 params and activations, fp32 masters in the optimizer, gradients accumulated in fp32
            "bf16": {"enabled": bf16},
            "data_types": {"grad_accum_dtype": "fp32" if bf16 else None},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        with _project_moe_is_deepspeed_moe():
            self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                    config=ds_config, mpu=mpu)

    def unwrap(self):
        return self._module

    def backward(self, loss: torch.Tensor, last_microbatch: bool = True) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the trainer already divides by the accumulation count

    @torch.no_grad()
    def step(self, lr: float) -> dict:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        skipped = bool(getattr(self.optimizer, "overflow", False)) or not math.isfinite(norm)
        return {"grad_norm": norm, "skipped": skipped}

    # ---- optimizer state in model space ---------------------------------------------------------------------
    # ZeRO 1/2/3 keep fp32 master partitions: deepspeed's safe_get/set_full_* helpers move whole-parameter state in
    # and out (collective). ZeRO-0 steps the client torch optimizer on the model params directly.
    def _zero(self) -> bool:
        return self.cfg.parallel.zero_stage > 0

    def _get_optim_state(self):
        return dict(self._iter_optim_state())

    def _iter_optim_state(self):
        """Collective under ZeRO: each parameter's moments are gathered over DP one at a time (a save never holds
        the whole model's moments at once)."""
        if not self._zero():
            for n, p in self.trainable():
                st = self.optimizer.state.get(p, {})
                if "exp_avg" in st:
                    yield n, {k: st[k] for k in MOMENTS}
            return
        if self._optim_step() == 0:  # no optimizer step yet (e.g. SIGTERM before step 1): no AdamW state exists
            return
        from deepspeed.utils import safe_get_full_optimizer_state
        # DeepSpeed 0.19.8 links the AdamW state to the params once, right after stepping the *first* param group,
        # so later groups (no_decay, expert groups) stay linked to an empty state: relink now that all are stepped.
        self.optimizer._hp_optimizer_states_linked = False
        self.optimizer._lazy_init_hp_params_optimizer_state()
        for n, p in self.trainable():
            st = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
            if all(v is not None for v in st.values()):
                yield n, st

    def _set_optim_state(self, states, step: int) -> None:
        if not states:
            return
        if not self._zero():
            for n, p in self.trainable():
                self.optimizer.state[p] = {"step": torch.tensor(float(step)),
                                           **{k: states[n][k].to(p.device).clone() for k in MOMENTS}}
            return
        from deepspeed.utils import safe_set_full_optimizer_state
        base = self.optimizer.optimizer
        # A fresh ZeRO optimizer creates its AdamW state lazily at the first step; create it now on the fp32
        # partitions and link it to the parameters, then fill it.
        for group in base.param_groups:
            for flat in group["params"]:
                if not base.state.get(flat):
                    base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                        "exp_avg_sq": torch.zeros_like(flat)}
        self.optimizer._lazy_init_hp_params_optimizer_state()
        for n, p in self.trainable():
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, states[n][k].to(p.device), k)
        for st in base.state.values():
            st["step"] = torch.tensor(float(step))

    def _optim_step(self) -> int:
        base = getattr(self.optimizer, "optimizer", self.optimizer)
        for st in base.state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def _after_load_params(self) -> None:
        if not self._zero():
            return
        from deepspeed.utils import safe_set_full_fp32_param
        for _, p in self.trainable():  # frozen weights have no fp32 master copy
            safe_set_full_fp32_param(p, p.detach().clone())

    # ---- fp32 masters under train.precision=bf16 (the module holds bf16; checkpoints hold the masters) -------------
    def _iter_saved_tensors(self):
        if not self._bf16_params():
            yield from super()._iter_saved_tensors()
            return
        from deepspeed.utils import safe_get_full_fp32_param
        for name, t in self._local_tensors().items():
            yield name, (safe_get_full_fp32_param(t) if isinstance(t, torch.nn.Parameter) and t.requires_grad else t)

    @torch.no_grad()
    def _load_masters(self, reader) -> None:
        if not self._bf16_params():
            return
        from deepspeed.utils import safe_set_full_fp32_param
        for n, p in self._module.named_parameters():
            if p.requires_grad:
                safe_set_full_fp32_param(p, reader.read_local(n, self.specs[n], dtype=torch.float32).to(p.device))
