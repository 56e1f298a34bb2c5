"""`unidiff train-decoder` (flow-matching teacher) and `unidiff distill` (few-step student), one loop each.

A step reads top to bottom: batch -> latent -> loss -> backward -> clip -> optimizer -> EMA -> log -> checkpoint.
The engine (native torch, or DeepSpeed ZeRO data parallel) only changes how backward/step run (`_Stepper`).
"""
from __future__ import annotations

import copy
import importlib
import itertools
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from training.decoder import checkpoint
from training.decoder.decode import decoder_meta, load_decoder
from training.decoder.distill import TrajectoryPool, distill_loss, trajectory_loss
from training.decoder.flow import flow_loss
from training.decoder.latent import build_latent
from training.decoder.pairs import batches, decoder_pairs
from training.decoder.release import load_weights
from training.decoder.sigvq import TokenDecoder
from training import accelerator
from training.lr_schedule import warmup_cosine
from training.tracking import Tracker

def build_decoder(dcfg) -> TokenDecoder:
    return TokenDecoder(dcfg)


class EMA:
    """Float32 shadow of the trainable weights (buffers and frozen weights are copied as they are)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - self.decay)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


class _Stepper:
    """native: torch AdamW + clip; deepspeed: deepspeed.initialize over the same module (ZeRO 0/1/2, DP on gloo/nccl)."""

    def __init__(self, model, lr, weight_decay, grad_clip, lr_fn, engine="native", zero_stage=1, batch_size=1):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
        self.engine_name, self.grad_clip, self.params = engine, grad_clip, params
        if engine == "deepspeed":
            ds = _import_deepspeed()
            ds_cfg = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
                      "gradient_clipping": grad_clip, "zero_optimization": {"stage": zero_stage},
                      "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
            self.engine, self.opt, _, self.sched = ds.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                                 config=ds_cfg)
            self.module = self.engine.module
        else:
            self.engine, self.opt, self.sched, self.module = model, opt, sched, model

    def step(self, loss: torch.Tensor) -> float:
        if self.engine_name == "deepspeed":
            self.engine.backward(loss)
            self.engine.step()  # clips, steps the optimizer and the lr scheduler
            return float("nan")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(gn)

    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def optimizer_state(self):
        """Replicated optimizer + scheduler state (native), or None: ZeRO shards the moments, so each rank
        saves its own partition through `rank_optimizer_state` instead."""
        if self.engine_name == "deepspeed":
            return None
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def rank_optimizer_state(self):
        """DeepSpeed: this rank's ZeRO partition of the AdamW state (the torch optimizer over its fp32 slice)."""
        if self.engine_name != "deepspeed":
            return None
        return {"optimizer": self.opt.optimizer.state_dict(), "scheduler": self.sched.state_dict()}

    def load_optimizer_state(self, state, rank_state=None) -> None:
        """Call after the module's weights were loaded."""
        if self.engine_name == "deepspeed":
            # ZeRO steps its own fp32 master slice and copies it into the module: refresh it from the loaded weights
            self.opt.refresh_fp32_params()
            state, opt = rank_state, self.opt.optimizer
        else:
            opt = self.opt
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])


def _import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if accelerator.cuda() else "cpu")
    # The shm all-reduce op JIT-compiles for ~1 min on CPU; gloo does not need it (research/cpu-megatron-deepspeed §4).
    # Patch through sys.modules: `import deepspeed.comm.torch` would return the torch package (name shadowing).
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.backend())
    return deepspeed


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def train_decoder(cfg, progress: bool = True) -> tuple[Path, TokenDecoder]:
    """Train the flow-matching teacher; returns its checkpoint dir (<run_dir>/decoder/checkpoints) and the model."""
    d = cfg.decoder
    torch.manual_seed(d.seed)
    out = Path(cfg.run_dir) / "decoder"
    ckpt_dir = out / "checkpoints"
    model = build_decoder(d)
    if d.init_from:
        load_weights(model, d.init_from, d.sigvq_from)
    stepper = _Stepper(model, d.lr, d.weight_decay, d.grad_clip, lambda s: warmup_cosine(s, 1.0, d.min_lr / d.lr, d.warmup_steps, d.train_steps),
                       engine=d.engine, zero_stage=d.zero_stage, batch_size=d.batch_size)
    rank, world = _rank_world()
    module = stepper.module
    ema = EMA(module, d.ema_decay)
    start = 0
    gen = torch.Generator().manual_seed(d.seed * 1000 + rank)
    found = checkpoint.load_latest(ckpt_dir, collective=True) if d.resume == "auto" else None
    if found is not None:
        start, state = found
        module.load_state_dict(state["model"])
        ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        mine = state.get("per_rank") or {}
        stepper.load_optimizer_state(state.get("optimizer"), mine.get("optimizer"))
        if "generator" in mine:  # the exact stream of the uninterrupted run (t, noise, condition dropout)
            gen.set_state(mine["generator"])
        if stepper.engine_name == "deepspeed" and mine.get("optimizer") is None:
            for _ in range(start):  # a checkpoint without this rank's optimizer state: the schedule still resumes
                stepper.sched.step()
    tracker = Tracker(cfg, out, enabled=rank == 0, job_type="train-decoder")  # its own wandb run id, kept on resume
    latent = build_latent(d)
    # the pairs a resumed run has already trained on are skipped: it continues the uninterrupted data order
    data = batches(itertools.islice(decoder_pairs(d, "train", rank, world, cfg.data), start * d.batch_size, None),
                   d.batch_size)
    module.train()
    bar = tqdm(range(start, d.train_steps), desc="train-decoder", disable=not progress or rank != 0,
               initial=start, total=d.train_steps)
    t0, loss_v = time.time(), float("nan")
    for step in bar:
        images, ids = next(data)
        loss = flow_loss(stepper.engine, latent.encode(images), ids, d, gen)
        gnorm = stepper.step(loss)
        ema.update(module)
        loss_v = float(loss.detach())
        if (step + 1) % d.log_every == 0:
            tracker.log(step + 1, {"decoder/loss": loss_v, "decoder/lr": stepper.lr(), "decoder/grad_norm": gnorm},
                        console=False)
        bar.set_postfix(loss=f"{loss_v:.4f}")
        last = step + 1 == d.train_steps
        if last or (d.save_every and (step + 1) % d.save_every == 0):  # collective
            checkpoint.save(ckpt_dir, step + 1, {
                "model": module.state_dict(), "ema": ema.shadow, "optimizer": stepper.optimizer_state(),
                "per_rank": {"generator": gen.get_state(), "optimizer": stepper.rank_optimizer_state()},
                "meta": decoder_meta(d, "euler", d.steps)}, keep_last=d.keep_last)
    tracker.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        print(f"train-decoder: {d.train_steps - start} steps in {time.time() - t0:.1f}s, final loss {loss_v:.4f}, "
              f"checkpoint {ckpt_dir}")
    return ckpt_dir, module


def distill(cfg, progress: bool = True) -> Path:
    """Turn the teacher into a `distill.steps`-step turbo student; returns its checkpoint dir."""
    d, dc = cfg.decoder, cfg.distill
    torch.manual_seed(dc.seed)
    teacher_src = dc.teacher or str(Path(cfg.run_dir) / "decoder" / "checkpoints")
    teacher, tmeta = load_decoder(teacher_src)
    student = copy.deepcopy(teacher).train()  # initialised from the teacher; the frozen copy is dropped below
    teacher.requires_grad_(False)
    tcfg = student.cfg
    out = Path(cfg.run_dir) / "distill"
    ckpt_dir = out / "checkpoints"
    stepper = _Stepper(student, dc.lr, dc.weight_decay, dc.grad_clip, lambda s: 1.0)
    ema = EMA(student, dc.ema_decay)
    tracker = Tracker(cfg, out, job_type="distill")
    latent = build_latent(tcfg)
    gen = torch.Generator().manual_seed(dc.seed)
    data = batches(decoder_pairs(tcfg, "train", 0, 1, cfg.data), dc.batch_size)
    t0, loss_v, pool = time.time(), float("nan"), None
    if dc.method == "trajectory_distillation":
        # rebuilt the same way on a resume (seeded, from the start of the data), then the RNG state is restored
        with tqdm(total=dc.pool_size, desc="distill: teacher trajectories", disable=not progress) as pbar:
            pool = TrajectoryPool.build(teacher.eval(), data, dc.pool_size, tcfg, dc, gen, pbar.update)
        print(f"distill: {dc.pool_size} teacher trajectories ({tcfg.steps} steps, w={dc.teacher_cfg_scale}) "
              f"in {time.time() - t0:.1f}s")
    if dc.method != "consistency_distillation":
        teacher = None  # nothing but the student (and its EMA) lives in the training loop
    start = 0
    found = checkpoint.load_latest(ckpt_dir) if dc.resume == "auto" else None
    if found is not None:
        start, state = found
        student.load_state_dict(state["model"])
        ema.shadow = {k: v.float() for k, v in state["ema"].items()}
        stepper.load_optimizer_state(state["optimizer"])
        gen.set_state(state["generator"])
        if pool is None:
            data = itertools.islice(data, start, None)  # one batch per step: continue the data order
        print(f"distill: resumed from {ckpt_dir} at step {start}", file=sys.stderr)
    bar = tqdm(range(start, dc.train_steps), desc=f"distill[{dc.method}]", disable=not progress, initial=start,
               total=dc.train_steps)
    for step in bar:
        if pool is not None:
            loss = trajectory_loss(student, pool, dc.batch_size, dc.loss, gen)
        else:
            images, ids = next(data)
            loss = distill_loss(student, latent.encode(images), ids, dc, teacher, gen)
        gnorm = stepper.step(loss)
        ema.update(student)
        loss_v = float(loss.detach())
        if (step + 1) % dc.log_every == 0:
            tracker.log(step + 1, {"distill/loss": loss_v, "distill/grad_norm": gnorm}, console=False)
        bar.set_postfix(loss=f"{loss_v:.4f}")
        if (step + 1 == dc.train_steps) or (dc.save_every and (step + 1) % dc.save_every == 0):
            meta = decoder_meta(tcfg, "turbo", dc.steps, {"distill": asdict(dc), "teacher": str(teacher_src)})
            checkpoint.save(ckpt_dir, step + 1, {"model": student.state_dict(), "ema": ema.shadow, "meta": meta,
                                                 "optimizer": stepper.optimizer_state(), "generator": gen.get_state()},
                            keep_last=dc.keep_last)
    tracker.close()
    print(f"distill[{dc.method}]: {dc.train_steps - start} steps in {time.time() - t0:.1f}s, final loss {loss_v:.4f}, "
          f"{dc.steps}-step student at {ckpt_dir}")
    return ckpt_dir
