"""What every engine shares: the trainer-facing contract, checkpoints in the reshardable format, full state dict.

An engine subclass builds `self.model` (possibly wrapped), `self.specs` (a `ShardSpec` per parameter and buffer of
the unwrapped model) and an optimizer, and implements backward/step plus three small hooks that expose the AdamW
moments in model space (`_get_optim_state` or, for an optimizer sharded by flat ranges, `_optim_entries`;
`_set_optim_state`, `_optim_step`). Everything else lives here once.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from training import accelerator
from training.engines.shard_format import ShardReader, write_meta, write_rank_shards
from training.engines.sharding import ShardSpec
from training.engines.world import ParallelWorld, accum_steps
from training.state_file import read_state, state_exists, write_state

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


def no_decay(name: str, p: torch.Tensor) -> bool:
    """No weight decay on norms, biases (1-D tensors) — expert_bias is a buffer and never reaches the optimizer."""
    return p.ndim < 2 or name.endswith(".bias")


class Engine:
    name = "base"
    world: ParallelWorld
    model: torch.nn.Module
    specs: dict[str, ShardSpec]

    def __init__(self, cfg):
        self.cfg = cfg

    # ---- trainer contract -----------------------------------------------------------------------------------
    def unwrap(self):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, last_microbatch: bool = True) -> None:
        """Accumulate this micro-batch's gradients; `last_microbatch`: the step's last one (an engine that
        overlaps the gradient reduction with the backward starts it there)."""
        raise NotImplementedError

    def step(self, lr: float) -> dict:
        raise NotImplementedError

    def autocast(self):
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_dp(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        t = t.detach().clone()
        if self.world.dp_size > 1:
            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            if op == "mean":
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.world.dp_group)
                t /= self.world.dp_size
            else:
                if op not in ops:
                    raise ValueError(f"all_reduce_dp op={op!r}: must be sum | mean | max | min")
                dist.all_reduce(t, op=ops[op], group=self.world.dp_group)
        return t

    def global_batch_accum(self) -> int:
        """Micro-batches per optimizer step on each rank (global batch / (micro batch x DP))."""
        return accum_steps(self.cfg, self.world.dp_size)

    # ---- optimizer state in model space (engine specific) ----------------------------------------------------
    def _get_optim_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{param name: {"exp_avg": local-shaped, "exp_avg_sq": local-shaped}} (collective for sharded optimizers)."""
        raise NotImplementedError

    def _optim_entries(self) -> list[tuple]:
        """Shard-format entries (key, global_shape, offsets, sizes, tensor) of the AdamW moments this rank writes:
        by default the whole local moments of the pieces it owns. Collective where `_get_optim_state` is."""
        entries = []
        for name, st in self._iter_optim_state():  # one parameter's moments at a time (they may be gathered)
            spec = self.specs[name]
            if spec.owner:  # keep only the owned boxes (copies), so the gathered moments are freed right away
                entries += [(f"optim.{k}/{name}", spec.global_shape, offsets, sizes, st[k][local].clone())
                            for local, offsets, sizes in spec.boxes() for k in MOMENTS if k in st]
        return entries

    def _iter_optim_state(self):
        """(name, {moment: local tensor}) per parameter with state; engines that gather override it to stream."""
        yield from self._get_optim_state().items()

    def _set_optim_state(self, states: dict[str, dict[str, torch.Tensor]], step: int) -> None:
        raise NotImplementedError

    def _optim_step(self) -> int:
        raise NotImplementedError

    def _after_load_params(self) -> None:
        """Refresh engine-side copies (master weights) after params were overwritten in place."""

    def _load_masters(self, reader: ShardReader) -> None:
        """Engines whose fp32 masters live outside the module (megatron, DeepSpeed under train.precision=bf16) set
        them here from the checkpoint's fp32 values: the module's copy was rounded to bf16 (resume stays exact)."""

    def _iter_saved_tensors(self):
        """(name, local tensor) of what `save` writes for params and buffers; engines with fp32 masters outside the
        module yield the masters' values for the params (or skip them and write them with `_optim_entries`)."""
        yield from self._local_tensors().items()

    def _bf16_params(self) -> bool:
        return self.cfg.train.precision == "bf16"

    def overlap_grad_reduce(self) -> bool:
        """train.overlap_grad_reduce resolved: auto = on when this run takes the CUDA branch (also rehearsed)."""
        setting = str(self.cfg.train.overlap_grad_reduce).lower()
        return accelerator.cuda() if setting == "auto" else setting == "true"

    def optimizer_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """Collective (ZeRO gathers). The AdamW moments in model space, {"<moment>/<param name>": the rank's local
        tensor (whole, for a replicated module)}, and the optimizer's step count: engine independent, so a ZeRO
        run's state loads into a native one. The decoder stages' checkpoints keep their optimizer state this way."""
        moments = {f"{k}/{n}": st[k].detach().clone() for n, st in self._iter_optim_state() for k in MOMENTS}
        return moments, self._optim_step()

    def load_optimizer_state(self, moments: dict[str, torch.Tensor], step: int) -> None:
        """The inverse of `optimizer_state`; call it after the weights were loaded (`load_full_state_dict`)."""
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in moments.items():
            k, name = key.split("/", 1)
            states.setdefault(name, {})[k] = t
        self._set_optim_state(states, step if states else 0)

    def layout(self) -> dict:
        w = self.world
        return {"engine": self.name, "world_size": w.world_size, "tensor": w.tp_size, "expert": w.ep_size,
                "expert_tensor": w.etp_size, "data": w.dp_size, "sequence_parallel": w.sequence_parallel}

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, param) of the weights the optimizer steps; frozen ones (requires_grad False) have no state."""
        return [(n, p) for n, p in self.unwrap().named_parameters() if p.requires_grad]

    def _local_tensors(self) -> dict[str, torch.Tensor]:
        m = self.unwrap()
        out = {n: p for n, p in m.named_parameters()}
        out.update({n: b for n, b in m.named_buffers()})
        return out

    # ---- checkpoints ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def save(self, ckpt_dir: Path, extra: dict) -> None:
        """Collective. Each rank writes the pieces it owns (params, buffers, AdamW moments) + its extra state."""
        t0 = time.time()
        ckpt_dir = Path(ckpt_dir)
        w = self.world
        entries = self._optim_entries()  # collective: every rank calls it
        for name, t in self._iter_saved_tensors():
            spec = self.specs[name]
            if spec.owner:
                entries += [(name, spec.global_shape, offsets, sizes, t[local]) for local, offsets, sizes in spec.boxes()]
        write_rank_shards(ckpt_dir, w.rank, entries)
        write_state(ckpt_dir / "extra" / f"rank{w.rank:05d}", extra)
        step = self._optim_step()
        if w.is_main:
            write_meta(ckpt_dir, {"layout": self.layout(), "optimizer": {"step": step},
                                  "model_config": _plain(self.unwrap().config)})
        w.barrier()
        if w.is_main:
            log.info("saved %s checkpoint (%s) to %s in %.1fs", self.name, w.describe(), ckpt_dir, time.time() - t0)

    @torch.no_grad()
    def load(self, ckpt_dir: Path) -> dict:
        """Collective. Loads model, buffers and optimizer moments from a checkpoint of any layout/engine; returns
        this rank's extra state (rank 0's when the saving run had fewer ranks)."""
        ckpt_dir = Path(ckpt_dir)
        reader = ShardReader(ckpt_dir)
        for name, t in self._local_tensors().items():
            t.copy_(reader.read_local(name, self.specs[name], dtype=t.dtype))
        self._after_load_params()
        states = {}
        have_optim = all(reader.has(f"optim.{k}/{n}") for n, _ in self.trainable() for k in MOMENTS)
        if have_optim:
            for n, p in self.trainable():
                states[n] = {k: reader.read_local(f"optim.{k}/{n}", self.specs[n], dtype=torch.float32)
                             for k in MOMENTS}
        elif self.world.is_main:
            log.warning("checkpoint %s has no optimizer state: starting the optimizer fresh", ckpt_dir)
        self._set_optim_state(states, int(reader.meta.get("optimizer", {}).get("step", 0)) if have_optim else 0)
        self._load_masters(reader)
        extra_path = ckpt_dir / "extra" / f"rank{self.world.rank:05d}"
        if not state_exists(extra_path):
            extra_path = ckpt_dir / "extra" / "rank00000"
        extra = read_state(extra_path) if state_exists(extra_path) else {}
        self.world.barrier()
        saved = reader.meta.get("layout", {})
        if self.world.is_main:
            log.info("loaded checkpoint %s (saved by %s tp=%s ep=%s etp=%s world=%s) into %s %s", ckpt_dir,
                     saved.get("engine"), saved.get("tensor"), saved.get("expert"), saved.get("expert_tensor", 1),
                     saved.get("world_size"),
                     self.name, self.world.describe())
        return extra

    @torch.no_grad()
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Set the weights from an unsharded state dict in the model's own names (e.g. an HF import)."""
        from training.engines.sharding import load_full
        load_full(self._local_tensors(), self.specs, full, strict=False)
        self._after_load_params()

    @torch.no_grad()
    def load_hf(self, path) -> dict:
        """Initialise the weights from an HF-format checkpoint dir (official names, released per-expert or merged
        layout), streamed tensor by tensor; each rank reads only its shard of the experts. Optimizer state is
        untouched (fresh). LoRA adapters keep their init (B = 0), or are read from model.lora.init_from (an adapter
        dir of `convert lora-export`, the same streaming)."""
        from training.hf_format import load_hf_shards
        from training.model.lora import is_adapter
        local = self._local_tensors()
        report = load_hf_shards(self.unwrap(), {n: t for n, t in local.items() if not is_adapter(n)}, self.specs,
                                path)
        if self.cfg.model.lora.init_from:
            from training.adapters import check_adapter_dir
            check_adapter_dir(self.cfg.model.lora.init_from, self.cfg.model.lora)
            load_hf_shards(self.unwrap(), {n: t for n, t in local.items() if is_adapter(n)}, self.specs,
                           self.cfg.model.lora.init_from)
        self._after_load_params()
        return report

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective. Unsharded weights (and buffers) in the model's own names on rank 0, None elsewhere.
        One full tensor at a time is assembled (reduce of owner-filled zeros), so peak memory is one tensor."""
        w = self.world
        out = {} if w.is_main else None
        for name, t in sorted(self._local_tensors().items()):
            spec = self.specs[name]
            if w.world_size == 1:
                out[name] = t.detach().clone()
                continue
            full = torch.zeros(spec.global_shape, dtype=torch.float32, device=t.device)
            if spec.owner:
                for local, offsets, sizes in spec.boxes():
                    full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = t[local].float()
            dist.reduce(full, dst=0)
            if w.is_main:
                out[name] = full.to(t.dtype).cpu()
        return out


def _plain(cfg) -> dict:
    import dataclasses
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
