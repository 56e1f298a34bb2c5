"""`unidiff train-decoder` (flow-matching teacher) and `unidiff distill` (few-step student): one loop, two losses.

A step reads top to bottom: batch -> latent -> loss -> engine backward/step (grad reduction over data parallel,
clip, AdamW) -> EMA -> log -> checkpoint. The engines are the trainer's (training/engines): the decoder is a ready
module they train data parallel (native all-reduce, or DeepSpeed ZeRO 0-2), on the rank's device.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable
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
from training.engines import Engine, build_engine
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


def stage_engine(cfg, model: torch.nn.Module, section, engine: str, zero_stage: int) -> Engine:
    """The trainer's engine over a decoder-stage module: data parallel only, fp32, this stage's optimizer settings
    (`section`: cfg.decoder or cfg.distill), one batch of `section.batch_size` pairs per rank per step."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train = dataclasses.replace(cfg.train, engine=engine, lr=section.lr, betas=[0.9, 0.99],
                                weight_decay=section.weight_decay, grad_clip=section.grad_clip, precision="fp32",
                                micro_batch_size=section.batch_size, global_batch_size=section.batch_size * world)
    parallel = dataclasses.replace(cfg.parallel, tensor=1, expert=1, expert_tensor=1, pipeline=1,
                                   sequence_parallel=False, zero_stage=zero_stage)
    return build_engine(dataclasses.replace(cfg, train=train, parallel=parallel), model=model)


def _on(device: torch.device, pairs):
    for images, ids in pairs:
        yield images.to(device), ids.to(device)


def _resume(engine: Engine, ema: EMA, gen: torch.Generator, ckpt_dir: Path, enabled: bool) -> int:
    """Restore weights, EMA, the optimizer (model-space moments: a checkpoint of either engine loads into either)
    and this rank's generator from the newest valid checkpoint (collective); returns its step, 0 if none."""
    found = checkpoint.load_latest(ckpt_dir, collective=True) if enabled else None
    if found is None:
        return 0
    step, state = found
    engine.load_full_state_dict(state["model"])
    dev = engine.world.device
    ema.shadow = {k: v.float().to(dev) for k, v in state["ema"].items()}
    engine.load_optimizer_state(state.get("moments", {}), int(state["optimizer"]["step"]))
    mine = state.get("per_rank") or {}
    if "generator" in mine:  # the exact stream of the uninterrupted run (t, noise, condition dropout)
        gen.set_state(mine["generator"])
    if engine.world.is_main:
        print(f"resumed from {ckpt_dir} at step {step}", file=sys.stderr)
    return step


def _run(engine: Engine, ema: EMA, gen: torch.Generator, tracker: Tracker, name: str, section, start: int,
         loss_fn: Callable[[], torch.Tensor], lr_fn: Callable[[int], float], save: Callable[[int, dict], None],
         progress: bool) -> float:
    """The one decoder-stage loop (`section`: cfg.decoder or cfg.distill, for the step counts); returns the last
    loss."""
    module, main, steps = engine.unwrap(), engine.world.is_main, section.train_steps
    module.train()
    bar = tqdm(range(start, steps), desc=name, disable=not progress or not main, initial=start, total=steps)
    loss_v = float("nan")
    for step in bar:
        loss = loss_fn()
        engine.backward(loss)
        lr = lr_fn(step)
        out = engine.step(lr)
        ema.update(module)
        loss_v = float(loss.detach())
        if (step + 1) % section.log_every == 0:
            tracker.log(step + 1, {f"{name}/loss": loss_v, f"{name}/lr": lr, f"{name}/grad_norm": out["grad_norm"],
                                   f"{name}/skipped": float(out["skipped"])}, console=False)
        bar.set_postfix(loss=f"{loss_v:.4f}")
        if step + 1 == steps or (section.save_every and (step + 1) % section.save_every == 0):  # collective
            moments, opt_step = engine.optimizer_state()
            save(step + 1, {"model": module.state_dict(), "ema": ema.shadow, "moments": moments,
                            "optimizer": {"step": opt_step}, "per_rank": {"generator": gen.get_state()}})
    tracker.close()
    engine.world.barrier()
    return loss_v


def train_decoder(cfg, progress: bool = True) -> tuple[Path, TokenDecoder]:
    """Train the flow-matching teacher; returns its checkpoint dir (<run_dir>/decoder/checkpoints) and the model."""
    d = cfg.decoder
    torch.manual_seed(d.seed)
    out = Path(cfg.run_dir) / "decoder"
    ckpt_dir = out / "checkpoints"
    model = build_decoder(d)
    if d.init_from:
        load_weights(model, d.init_from, d.sigvq_from)
    engine = stage_engine(cfg, model, d, d.engine, d.zero_stage)
    w, module = engine.world, engine.unwrap()
    ema = EMA(module, d.ema_decay)
    gen = torch.Generator().manual_seed(d.seed * 1000 + w.dp_rank)
    start = _resume(engine, ema, gen, ckpt_dir, d.resume == "auto")
    tracker = Tracker(cfg, out, enabled=w.is_main, job_type="train-decoder")  # its own wandb run id, kept on resume
    latent = build_latent(d, w.device)
    # the pairs a resumed run has already trained on are skipped: it continues the uninterrupted data order
    pairs = itertools.islice(decoder_pairs(d, "train", w.dp_rank, w.dp_size, cfg.data), start * d.batch_size, None)
    data = _on(w.device, batches(pairs, d.batch_size))

    def loss_fn():
        images, ids = next(data)
        return flow_loss(engine.model, latent.encode(images), ids, d, gen)

    t0 = time.time()
    loss_v = _run(engine, ema, gen, tracker, "decoder", d, start, loss_fn,
                  lambda s: d.lr * warmup_cosine(s, 1.0, d.min_lr / d.lr, d.warmup_steps, d.train_steps),
                  lambda step, state: checkpoint.save(ckpt_dir, step, {**state, "meta": decoder_meta(d, "euler", d.steps)},
                                                      keep_last=d.keep_last), progress)
    if w.is_main:
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
    engine = stage_engine(cfg, student, dc, d.engine, d.zero_stage)
    w, module = engine.world, engine.unwrap()
    teacher.to(w.device)
    ema = EMA(module, dc.ema_decay)
    tracker = Tracker(cfg, out, enabled=w.is_main, job_type="distill")
    latent = build_latent(tcfg, w.device)
    gen = torch.Generator().manual_seed(dc.seed + w.dp_rank)
    data = _on(w.device, batches(decoder_pairs(tcfg, "train", w.dp_rank, w.dp_size, cfg.data), dc.batch_size))
    t0, pool = time.time(), None
    if dc.method == "trajectory_distillation":
        # rebuilt the same way on a resume (seeded, from the start of the data), then the RNG state is restored
        with tqdm(total=dc.pool_size, desc="distill: teacher trajectories", disable=not progress or not w.is_main) as pb:
            pool = TrajectoryPool.build(teacher.eval(), data, dc.pool_size, tcfg, dc, gen, pb.update)
        if w.is_main:
            print(f"distill: {dc.pool_size} teacher trajectories ({tcfg.steps} steps, w={dc.teacher_cfg_scale}) "
                  f"in {time.time() - t0:.1f}s")
    if dc.method != "consistency_distillation":
        teacher = None  # nothing but the student (and its EMA) lives in the training loop
    start = _resume(engine, ema, gen, ckpt_dir, dc.resume == "auto")
    if pool is None:
        data = itertools.islice(data, start, None)  # one batch per step: continue the data order

    def loss_fn():
        if pool is not None:
            return trajectory_loss(engine.model, pool, dc.batch_size, dc.loss, gen)
        images, ids = next(data)
        return distill_loss(engine.model, latent.encode(images), ids, dc, teacher, gen)

    meta = decoder_meta(tcfg, "turbo", dc.steps, {"distill": asdict(dc), "teacher": str(teacher_src)})
    loss_v = _run(engine, ema, gen, tracker, "distill", dc, start, loss_fn, lambda s: dc.lr,
                  lambda step, state: checkpoint.save(ckpt_dir, step, {**state, "meta": meta}, keep_last=dc.keep_last),
                  progress)
    if w.is_main:
        print(f"distill[{dc.method}]: {dc.train_steps - start} steps in {time.time() - t0:.1f}s, final loss "
              f"{loss_v:.4f}, {dc.steps}-step student at {ckpt_dir}")
    return ckpt_dir
