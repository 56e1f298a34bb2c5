"""The two passes of one rehearsed rank, each run in a child process of its own (`python -m training.rehearsal.passes`)
so the fake process group, the stubs and a possible abort stay out of the caller:

    device   CUDA decisions (accelerator.rehearse_cuda), fake cuda tensors, forward only (autograd on fake cuda
             aborts the CPU build): the real engine build, the trainer's train_step with the backward skipped (the
             engine's step still reduces the (zero) gradients, clips and steps), the trainer's per-step flag
             all-reduce and host metric copy -> device violations, collectives per group, host syncs per step
    memory   fake cpu tensors (CPU autocast), two one-micro-batch steps (forward + backward + optimizer step; the
             second has the optimizer state of a running job) under MemTracker, the second under FlopCounterMode
             -> peak bytes by category, FLOPs per micro-batch; and the checkpoint's shard plan

Both build the engine named by the config over a fake process group of the real world size, with this rank's
rank / local rank, and feed it real batches of the real shape from the config's loader.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist

from data_pipeline.loader import build_loader
from data_pipeline.text_tokenizer import specials_for
from training import accelerator
from training.config import load_config
from training.engines import build_engine, megatron_cpu_compat as compat
from training.rehearsal.dispatch import Audit, RehearsalMode
from training.rehearsal.guards import DeviceGuardFree, presented_as_meta
from training.trainer import _any_rank, host_metrics, train_step


def _group_labels(world) -> dict[str, str]:
    labels = {}
    for name in ("dp", "tp", "ep", "etp", "edp"):
        g = getattr(world, f"{name}_group")
        if g is not None and g.group_name not in labels:
            labels[g.group_name] = name
        elif g is not None:
            labels[g.group_name] += f"|{name}"  # one group object serving two roles
    labels.setdefault(dist.group.WORLD.group_name, "world")
    for name, label in list(labels.items()):  # engines' other groups over the same ranks get the same label
        g = next(getattr(world, f"{n}_group") for n in label.split("|")[:1]) if label != "world" else dist.group.WORLD
        labels.setdefault(tuple(dist.get_process_group_ranks(g)), label)
    return labels


def _batches(cfg, world, count: int) -> list[dict]:
    """Real host batches from the config's loader (drawn before any fake mode, so their values are real)."""
    loader = build_loader(cfg, seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                          dp_rank=world.dp_rank, dp_size=world.dp_size, seed=cfg.train.seed)
    it = iter(loader)
    return [next(it) for _ in range(count)]


def _init_fake_world(rank: int, world_size: int, gpus_per_node: int, seed: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore
    torch.manual_seed(seed + rank)  # as the trainer seeds: the same masks in every rehearsal of this rank
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank % gpus_per_node),
                      LOCAL_WORLD_SIZE=str(gpus_per_node))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)

    def all_gather_object(out, obj, group=None):  # pickles travel as tensors with values: every rank alike
        out[:] = [obj] * len(out)

    dist.all_gather_object = all_gather_object


def _shard_plan(engine) -> dict:
    """Bytes this rank writes to a checkpoint (params, buffers and AdamW moments it owns), from the engine's own
    entries: the plan the save would follow, without writing."""
    entries = engine._optim_entries()
    for name, t in engine._local_tensors().items():
        spec = engine.specs[name]
        if spec.owner:
            entries += [(name, spec.global_shape, o, s, t[local]) for local, o, s in spec.boxes()]
    nbytes = sum(e[4].numel() * e[4].element_size() for e in entries)
    return {"checkpoint_entries": len(entries), "checkpoint_bytes": int(nbytes)}


def device_pass(cfg, rank: int, world_size: int, gpus_per_node: int) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    _init_fake_world(rank, world_size, gpus_per_node, cfg.train.seed)
    audit = Audit()
    with accelerator.rehearse_cuda(), _megatron_runtime(cfg, on_cuda=True):
        device = accelerator.device_for(0)
        with FakeTensorMode(allow_non_fake_inputs=True), RehearsalMode(device, {}, audit) as mode, DeviceGuardFree(audit):
            engine = build_engine(cfg)
            mode.groups = _group_labels(engine.world)
            audit.collectives.clear()  # count what a step does, not what the build did
            accum = engine.global_batch_accum()
            with _fake_free():
                batches = _batches(cfg, engine.world, accum)
            engine.backward = lambda loss, **kw: None  # no autograd on fake cuda (it aborts the CPU build)
            with torch.no_grad():
                sums, result, loads = train_step(engine, iter(batches), accum, cfg, 0, specials_for(cfg))
            host_metrics(sums)
            _any_rank(False)
            tokens = int(sums["tokens"]) * engine.world.dp_size
    return {"pass": "device", **audit.summary(), "tokens_per_step": tokens, "micro_batches": accum,
            "layout": engine.layout(), "describe": engine.world.describe()}


def memory_pass(cfg, rank: int, world_size: int, gpus_per_node: int) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    _init_fake_world(rank, world_size, gpus_per_node, cfg.train.seed)
    _register_flop_formulas()
    cpu = torch.device("cpu")
    mt = MemTracker()
    audit = Audit()
    with accelerator.rehearse_cuda(tensors_on="cpu"), _megatron_runtime(cfg, on_cuda=False), \
            _frozen_params_take_no_hooks(), FakeTensorMode(allow_non_fake_inputs=True), \
            RehearsalMode(cpu, {}, audit) as mode, DeviceGuardFree(audit):
        with mt:
            engine = build_engine(cfg)
            mode.groups = _group_labels(engine.world)
            if isinstance(getattr(engine.model, "buffers", None), list):
                engine.model.buffers = _BufferList(engine.model)
            for opt in _torch_optimizers(engine):
                mt.track_external(engine.unwrap(), opt)
            with _fake_free():
                batches = _batches(cfg, engine.world, 2)
            # Two steps: the optimizer state exists from the first one's end, so the second shows the steady peak.
            train_step(engine, iter(batches[:1]), 1, cfg, 0, specials_for(cfg))
            mt.reset_mod_stats()
            backward = _count_backward_collectives(engine, audit)
            flops = FlopCounterMode(display=False)
            with flops:
                sums, _, _ = train_step(engine, iter(batches[1:]), 1, cfg, 1, specials_for(cfg))
            masked = int(sums["n_masked"])  # exact: the mask is drawn from the batch alone (a shadowed value)
        peak = mt.get_tracker_snapshot("peak").get(cpu, {})
        plan = _shard_plan(engine)
    by = {str(k).split(".")[-1].lower(): int(v) for k, v in peak.items()}
    moved = min(_grad_buffer_bytes(engine), by.get("act", 0))  # allocated at build: MemTracker files it as act
    by["grad"], by["act"] = by.get("grad", 0) + moved, by.get("act", 0) - moved
    moved = min(_master_bytes(engine), by["act"])  # the fp32 masters of bf16 params: made at build, filed as act
    by["master"], by["act"] = moved, by["act"] - moved
    return {"pass": "memory", "peak_bytes": by.pop("total", 0), "peak_by_category": by,
            "flops_per_micro_batch": int(flops.get_total_flops()), "block_size": int(sums["block_size"]),
            "tokens_per_micro_batch": int(sums["tokens"]), "masked_tokens": masked,
            "backward_collectives": backward,
            "params_local": _local_params(engine), **plan}


class _BufferList(list):
    """megatron's DDP keeps its grad buffers in `self.buffers`, shadowing Module.buffers() that MemTracker calls:
    both in one object."""

    def __init__(self, module):
        super().__init__(module.buffers)
        self._module = module

    def __call__(self, recurse: bool = True):
        return torch.nn.Module.buffers(self._module, recurse)


def _count_backward_collectives(engine, audit: Audit) -> dict:
    """The collectives of one micro-batch's backward (expert all-to-all, TP/SP mappings), which the forward-only
    device pass cannot see: filled in while the memory pass runs engine.backward."""
    counted: dict = {}
    run = engine.backward

    def backward(loss, **kwargs):
        before = {k: dict(v) for k, v in audit.collectives.items()}
        run(loss, **kwargs)
        for key, st in audit.collectives.items():
            was = before.get(key, {"calls": 0, "bytes": 0})
            if st["calls"] > was["calls"]:
                counted[key] = {"calls": st["calls"] - was["calls"], "bytes": st["bytes"] - was["bytes"]}

    engine.backward = backward
    return counted


def _register_flop_formulas() -> None:
    """FlopCounterMode has no formula for two kernels the memory pass runs: torch._grouped_mm (the experts) and the
    CPU build's fused SDPA (the CUDA kernels' formulas are there): 2 x output x contraction, and torch's own SDPA
    counts."""
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    @register_flop_formula(aten._grouped_mm)
    def _gmm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        if len(out_shape) == 3 and len(a_shape) == 2 and len(b_shape) == 2:  # weight grad: groups split the K dim
            return 2 * out_shape[1] * out_shape[2] * a_shape[1]
        n = 1
        for d in out_shape:
            n *= d
        return 2 * n * a_shape[-1]

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa(q, k, v, *args, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _sdpa_bwd(grad_out, q, k, v, *args, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, q, k, v)


def _grad_buffer_bytes(engine) -> int:
    """megatron DDP's contiguous main-grad buffers, alive for the whole run (its param buffer holds the params
    themselves, which MemTracker already counts)."""
    total = 0
    lists = [getattr(engine.model, n, None) for n in ("buffers", "expert_parallel_buffers")]
    for b in [b for bl in lists if isinstance(bl, list) for b in bl]:
        t = getattr(b, "grad_data", None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def _master_bytes(engine) -> int:
    """fp32 master weights under train.precision=bf16: native's copies (engines/master.py), megatron's
    distributed-optimizer shards (its fp32 main params of the bf16 model params)."""
    tensors = list(engine.master.of.values()) if getattr(engine, "master", None) else []
    for opt in getattr(engine.optimizer, "chained_optimizers", []):
        tensors += [t for group in getattr(opt, "shard_fp32_from_float16_groups", []) for t in group]
    return sum(t.numel() * t.element_size() for t in tensors)


def _local_params(engine) -> int:
    return int(sum(p.numel() for p in engine.unwrap().parameters()))


def _torch_optimizers(engine) -> list:
    opt = engine.optimizer
    if hasattr(opt, "chained_optimizers"):  # megatron: one DistributedOptimizer per dense / expert params
        return [o.optimizer for o in opt.chained_optimizers]
    return [getattr(opt, "optimizer", opt)]


@contextlib.contextmanager
def _frozen_params_take_no_hooks():
    """MemTracker puts a grad hook on every parameter of a module it enters; a frozen one (model.lora's base) refuses
    hooks, and gets no grad to count: skip it there. (The device pass builds the engine without this.) On the class
    of every tensor: a parameter over a fake tensor is a FakeTensor flagged `_is_param`, not an nn.Parameter."""
    cls = torch.Tensor
    saved = cls.register_hook, cls.register_post_accumulate_grad_hook

    def only_trainable(register):
        def hook(self, fn):
            if self.requires_grad:
                return register(self, fn)
            return torch.utils.hooks.RemovableHandle(collections.OrderedDict())
        return hook

    cls.register_hook, cls.register_post_accumulate_grad_hook = map(only_trainable, saved)
    try:
        yield
    finally:
        cls.register_hook, cls.register_post_accumulate_grad_hook = saved


@contextlib.contextmanager
def _fake_free():
    """Real tensors for the loader (batches must carry real values)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes
    with unset_fake_temporarily(), _disable_current_modes():
        yield


@contextlib.contextmanager
def _megatron_runtime(cfg, on_cuda: bool):
    """megatron-core's gloo side groups (optimizer bookkeeping) become fake groups like every other. On fake cuda
    (`on_cuda`) also: torch.cuda's runtime answers for a fake cuda:0 (streams, events, current device); its DDP
    takes each param's AccumulateGrad node through `param.expand_as(param)` and its optimizer slices the params,
    autograd metadata that the CPU build cannot create for a cuda tensor (the process aborts): the DDP wrap runs
    with the params presented as meta, the optimizer build without grad mode."""
    if cfg.train.engine != "megatron":
        yield
        return
    import megatron.core.optimizer as mopt
    from megatron.core.distributed import DistributedDataParallel

    init, new_group, get_optimizer = DistributedDataParallel.__init__, dist.new_group, mopt.get_megatron_optimizer

    def fake_gloo(*a, **k):
        if k.get("backend") == "gloo":
            k["backend"] = "fake"
        return new_group(*a, **k)

    def ddp_init(self, config, ddp_config, module, *a, **k):
        with presented_as_meta(list(module.parameters())):
            init(self, config, ddp_config, module, *a, **k)

    def no_grad_optimizer(*a, **k):
        with torch.no_grad():
            return get_optimizer(*a, **k)

    dist.new_group = fake_gloo
    if on_cuda:
        compat.stub_cuda_runtime(current_device=accelerator.device_for(0))
        DistributedDataParallel.__init__, mopt.get_megatron_optimizer = ddp_init, no_grad_optimizer
    try:
        yield
    finally:
        DistributedDataParallel.__init__, dist.new_group, mopt.get_megatron_optimizer = init, new_group, get_optimizer


def main(argv: list[str]) -> int:
    """python -m training.rehearsal.passes PASS RANK WORLD GPUS_PER_NODE CONFIG [overrides...] -> one JSON line"""
    which, rank, world, gpn, path, *overrides = argv
    cfg = load_config(path, overrides)
    fn = {"device": device_pass, "memory": memory_pass}[which]
    out = fn(cfg, int(rank), int(world), int(gpn))
    sys.stdout.write("REHEARSAL " + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip library atexit handlers (megatron, deepspeed) that expect a real process group


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
