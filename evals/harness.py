"""`unidiff eval CONFIG --tasks elbo,choice,...`: build the context once, run each task, write the report.

Where things come from (all from the config, nothing downloaded):
  backbone   eval.checkpoint: "" = latest valid checkpoint in <run_dir>/checkpoints, a checkpoint dir, an HF dir
             (config.json + safetensors), or "none"; loaded by training.inference.backbone (bf16 on CUDA)
  decoders   eval.decoder_student ("" = <run_dir>/distill/checkpoints) and eval.decoder_teacher
             ("" = <run_dir>/decoder/checkpoints); "none" skips one
  tokenizers data.text_tokenizer (or <data.raw_dir>/tokenizer.json) and data.image_tokenizer.path
  held-out   the shapes world's `eval.split` scenes (answer keys regenerated from data.sample.seed), and the
             `data.token_dir/<split>` token shards for elbo when they exist
A part that cannot be loaded is recorded with the reason; the tasks that need it are reported as skipped with that
reason. Likelihood tasks (elbo, choice) run data-parallel when launched with torchrun; the others on rank 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from evals.config import TASK_NAMES
from evals.context import EvalContext, TaskResult
from evals.tasks import get_task
from training import accelerator
from training.config_errors import ConfigError
from training.inference.backbone import load_backbone
from training.inference.decoders import decoder_fn


def run_tasks(ctx: EvalContext, names: list[str]) -> list[TaskResult]:
    results = []
    for name in names:
        task = get_task(name)
        if not task.distributed and ctx.rank != 0:
            continue  # generation tasks run on rank 0 only
        t0 = time.time()
        try:
            r = task.run(ctx)
        except Exception as e:  # one broken task must not hide the others' results; the report names the error
            if ctx.world > 1 and task.distributed:
                raise  # the other ranks wait in a collective: fail loudly instead of hanging
            r = TaskResult(name, status="failed", reason=f"{type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
        r.seconds = r.seconds or time.time() - t0
        if ctx.is_main:
            print(f"eval {name}: {r.status} {_line(r)} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)
        results.append(r)
    return results


def _line(r: TaskResult) -> str:
    from evals.report import headline

    if r.status != "ok":
        return r.reason
    m, s, b = headline(r)
    return f"{m}={s} (baseline {b})"


# ------------------------------------------------------------------------------------------------ loading

def build_context(cfg, rank: int = 0, world: int = 1, device=None, out_dir: Path | None = None) -> EvalContext:
    e = cfg.eval
    device = torch.device(device or accelerator.device_for(int(os.environ.get("LOCAL_RANK", "0"))))
    ctx = EvalContext(cfg=cfg, device=device, rank=rank, world=world, run_dir=Path(cfg.run_dir), out_dir=out_dir)
    meta = {}

    def attempt(what: str, fn):
        try:
            return fn()
        except Exception as ex:  # recorded and shown by every task that needs it
            ctx.unavailable[what] = f"{type(ex).__name__}: {ex}"
            return None

    from data_pipeline.layout import SpecialTokens
    from data_pipeline.text_tokenizer import load_text_tokenizer

    tok_path = cfg.data.text_tokenizer or str(Path(cfg.data.raw_dir) / "tokenizer.json")
    ctx.tokenizer = attempt("tokenizer", lambda: load_text_tokenizer(tok_path))
    if ctx.tokenizer is not None:
        ctx.specials = attempt("specials", lambda: SpecialTokens.from_tokenizer(ctx.tokenizer))
    else:
        ctx.unavailable["specials"] = ctx.unavailable["tokenizer"]

    def image_tok():
        from data_pipeline.image_tokenizer import load_image_tokenizer

        return load_image_tokenizer(cfg.data.image_tokenizer.path, device).eval()

    ctx.image_tokenizer = attempt("image_tokenizer", image_tok)
    if e.checkpoint == "none":
        ctx.unavailable["model"] = "eval.checkpoint=none"
    elif (loaded := attempt("model", lambda: load_backbone(cfg, e.checkpoint, device))) is not None:
        ctx.model, meta["checkpoint"] = loaded
    for name, src, default in (("student", e.decoder_student, Path(cfg.run_dir) / "distill" / "checkpoints"),
                               ("teacher", e.decoder_teacher, Path(cfg.run_dir) / "decoder" / "checkpoints")):
        if src == "none":
            continue
        fn = attempt(f"decoder_{name}", lambda s=src or str(default): decoder_fn(s, e.decoder_steps))
        if fn is not None:
            ctx.decoders[name] = fn
            meta[f"decoder_{name}"] = src or str(default)
    if "student" in ctx.decoders and "teacher" in ctx.decoders:  # the undistilled teacher at the student's steps
        k = ctx.decoders["student"].steps
        if k != ctx.decoders["teacher"].steps:
            ctx.decoders[f"teacher_{k}"] = decoder_fn(ctx.decoders["teacher"].loaded, k)  # same weights, no reload
    if not ctx.decoders:
        ctx.unavailable["decoders"] = "; ".join(v for k, v in ctx.unavailable.items() if k.startswith("decoder_"))
    if ctx.tokenizer is not None and ctx.specials is not None and ctx.image_tokenizer is not None:
        from evals.heldout import build_shapes_heldout

        ctx.data = attempt("data", lambda: build_shapes_heldout(cfg, ctx.tokenizer, ctx.specials, ctx.image_tokenizer,
                                                                e.num_samples, e.caption_prompt, e.split,
                                                                progress=e.progress and rank == 0))
    else:
        ctx.unavailable["data"] = "held-out items need the text tokenizer and the image tokenizer"
    ctx.loaded = meta  # type: ignore[attr-defined]
    return ctx


# ------------------------------------------------------------------------------------------------ report

def training_figures(ctx: EvalContext, out_dir: Path) -> dict[str, str]:
    """Loss curves from the run's metrics.jsonl files and per-layer expert-load heatmaps (training: the trainer's
    last all-reduced loads; eval: routing of the held-out elbo sequences)."""
    from evals.figures import expert_heatmap, loss_curves
    from training.tracking import read_metrics

    figs: dict[str, str] = {}
    run_dir = ctx.run_dir or Path(".")
    series = {name: read_metrics(d) for name, d in (("backbone", run_dir), ("decoder", run_dir / "decoder"),
                                                    ("distill", run_dir / "distill"))}
    p = loss_curves({k: v for k, v in series.items() if v}, out_dir / "loss_curves.png")
    if p:
        figs["loss curves (metrics.jsonl)"] = p.name
    train_loads = run_dir / "expert_load_last.json"
    if train_loads.exists():
        p = expert_heatmap([torch.tensor(l) for l in json.loads(train_loads.read_text())], out_dir / "expert_load_train.png",
                           "expert load, last training step")
        if p:
            figs["expert load (training)"] = p.name
    loads = heldout_expert_load(ctx)
    if loads:
        p = expert_heatmap(loads, out_dir / "expert_load_eval.png", "expert load on held-out sequences")
        if p:
            figs["expert load (held-out)"] = p.name
    return figs


@torch.no_grad()
def heldout_expert_load(ctx: EvalContext) -> list[torch.Tensor]:
    """Per MoE layer token-expert counts over one clean forward of (up to batch_size) held-out elbo sequences."""
    if ctx.model is None or ctx.data is None or not ctx.data.elbo:
        return []
    loads = None
    for it in ctx.data.elbo[:ctx.ecfg.batch_size]:
        out = ctx.model(input_ids=it.ids[None].to(ctx.device))
        router = getattr(out, "router", None) or []
        cur = [s.load.detach().float().cpu() for s in router]
        loads = cur if loads is None else [a + b for a, b in zip(loads, cur)]
    return loads or []


def evaluate(cfg, task_names: list[str], ctx: EvalContext | None = None) -> list[TaskResult]:
    """Run the tasks and (rank 0) write report.json / report.md / figures under eval.out_dir and log to wandb."""
    from evals.report import flat_metrics, write_report

    out_dir = Path(cfg.eval.out_dir) if cfg.eval.out_dir else Path(cfg.run_dir) / "eval"
    if ctx is None:
        import os

        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from training.engines.world import init_distributed

            rank, world, device, _ = init_distributed()
        ctx = build_context(cfg, rank, world, out_dir=out_dir)
    ctx.out_dir = out_dir
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = run_tasks(ctx, task_names)
    if ctx.is_main:
        figs = training_figures(ctx, out_dir)
        meta = {"run_dir": str(ctx.run_dir), "tasks": ",".join(task_names), "device": str(ctx.device),
                "data_parallel": ctx.world, **getattr(ctx, "loaded", {}),
                "heldout": getattr(ctx.data, "source", "none"), "seconds": round(time.time() - t0, 2)}
        for k, why in ctx.unavailable.items():
            meta[f"unavailable.{k}"] = why
        jpath, mpath = write_report(results, out_dir, meta, figs)
        if cfg.tracking.wandb != "disabled":
            from training.tracking import Tracker

            tracker = Tracker(_eval_tracking(cfg, out_dir), out_dir, enabled=True, job_type="eval")
            flat = flat_metrics(results)
            tracker.log(0, flat, console=False)
            tracker.summary(flat)
            if tracker.wandb is not None:
                import wandb

                images = {f"eval/figure/{Path(p).stem}": wandb.Image(str(out_dir / p))
                          for r in results for p in r.figures.values()}
                images.update({f"eval/figure/{Path(p).stem}": wandb.Image(str(out_dir / p)) for p in figs.values()})
                if images:
                    tracker.wandb.log(images, step=0)
                # Tracker.close() calls finish(quiet=True), which wandb 0.31 rejects: finish here first.
                tracker.wandb.finish()
                tracker.wandb = None
            tracker.close()
        ok = sum(r.status == "ok" for r in results)
        print(f"eval: {ok}/{len(results)} tasks ok in {time.time() - t0:.1f}s -> {mpath} , {jpath}", file=sys.stderr)
    return results


def _eval_tracking(cfg, out_dir: Path):
    """The eval gets its own wandb run (job_type eval), whose id is kept in <out_dir>/wandb_run_id so a re-run of
    the eval continues it; the id is made here rather than by wandb (no wandb.util.generate_id in wandb 0.31)."""
    import uuid

    id_file = out_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else f"{cfg.run.name}-eval-{uuid.uuid4().hex[:6]}"
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_id=run_id))


def parse_tasks(arg: str | None, default: list[str]) -> list[str]:
    names = [t.strip() for t in arg.split(",") if t.strip()] if arg else list(default)
    bad = [t for t in names if t not in TASK_NAMES]
    if bad or not names:
        raise ConfigError(f"--tasks={arg} is not allowed: must be a comma list of {' | '.join(TASK_NAMES)}")
    return names
