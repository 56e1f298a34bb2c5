"""The training loop: one path from batch to loss to optimizer, for every engine and world size.

    engine (native | megatron | deepspeed) <- config          data loader keyed on the data-parallel rank
    for step: block size + LR from their schedules
        for each micro-batch: loss = diffusion_loss(model, batch)  ->  engine.backward(loss / accum)
        engine.step(lr)  (clip, NaN/inf guard)  ->  expert-bias update  ->  metrics  ->  checkpoint / signal exit

Resume (`train.resume: auto`) restores model, optimizer, step, LR schedule position, RNG, loader state and the wandb
run id from the newest valid checkpoint. SIGTERM / SIGUSR1 (the SLURM pre-timeout signal) make every rank agree
to save at the end of the current step and exit with code 0.
"""
from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training import accelerator
from training.config import Config, save_config
from training.diffusion.schedule import block_size_at, pad_multiple, whole_sequence
from training.lr_schedule import wsd


def lr_at(step: int, cfg) -> float:
    """The backbone's warmup-stable-decay schedule (training/lr_schedule.py)."""
    t = cfg.train
    return wsd(step, t.lr, t.min_lr, t.warmup_steps, t.steps, t.decay_steps)


def flops_per_token(mcfg, seq_len: int, block_diffusion: bool, masked_frac: float = 1.0) -> float:
    """Training FLOPs (forward + backward = 3 x forward) per x_t token of a packed sequence, for the MFU estimate.
    Block diffusion runs the body on x_t || x_0 (2L positions); the LM head runs on the masked x_t rows only
    (`masked_frac` of the tokens; objective.masked_head_ce). Activation recomputation is not counted (not model work)."""
    h, layers = mcfg.hidden_size, mcfg.num_hidden_layers
    attn_proj = h * (mcfg.num_attention_heads + 2 * mcfg.num_key_value_heads) * mcfg.head_dim \
        + mcfg.num_attention_heads * mcfg.head_dim * h
    dense = 3 * h * mcfg.intermediate_size
    moe = 3 * h * mcfg.moe_intermediate_size * (mcfg.num_experts_per_tok + mcfg.num_shared_experts) \
        + h * mcfg.num_experts
    k = mcfg.first_k_dense_replace
    body = layers * attn_proj + k * dense + (layers - k) * moe  # active matmul params per position
    ctx = 2 * seq_len if block_diffusion else seq_len
    per_position = 2 * body + 2 * 2 * layers * mcfg.num_attention_heads * mcfg.head_dim * ctx  # + QK^T and AV
    return 3 * (per_position * ctx / seq_len + 2 * h * mcfg.vocab_size * masked_frac)


class _StopFlag:
    """Set by SIGTERM/SIGUSR1; checked once per step and agreed on by all ranks (max all-reduce). A signal that came
    before train() started counts too: `unidiff train` records them from its first line (launch/cli.py
    EarlySignals), and this flag takes over the `received` list of any handler it replaces."""

    def __init__(self):
        self.raised = False
        self.signum = None
        for s in (signal.SIGTERM, signal.SIGUSR1):
            earlier = signal.signal(s, self._handle)  # ours first, then what the earlier one saw: nothing is lost
            for signum in list(getattr(earlier, "received", ())):
                self._handle(signum, None)

    def _handle(self, signum, frame):
        self.raised, self.signum = True, signum


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (so all ranks save and stop at the same step)."""
    if not torch.distributed.is_initialized():
        return flag
    t = accelerator.all_reduce_host(torch.tensor([int(flag)]), op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _which_ranks(flag: bool, w) -> str:
    """Collective (every rank stops at the same step): the ranks whose own loss was non-finite."""
    t = torch.zeros(w.world_size)
    t[w.rank] = float(flag)
    bad = accelerator.all_reduce_host(t).nonzero().flatten().tolist()
    return f"non-finite loss on rank(s) {bad}" if bad else "the loss was finite on every rank, a gradient was not"


def to_device(batch: dict, device: torch.device) -> dict:
    """The loader yields host tensors; every step moves them to the engine's device here, and only here."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(engine, batches, accum: int, cfg, step: int, specials) -> tuple[dict, dict, list]:
    """One optimizer step over `accum` micro-batches: what the trainer runs and `unidiff plan` rehearses.
    Returns (the loss metrics as device tensors, averaged over micro-batches and data parallel, the engine's step
    result, per-layer expert loads summed over data parallel). No host synchronisation here but the engine's own
    (grad norm)."""
    from training.diffusion import corrupt, diffusion_loss

    engine.model.train()
    w = engine.world
    # All of the step's masks first: with "token" normalisation the loss is the weighted CE sum over the global
    # batch / its masked count (one all-reduce), not a mean of per-rank ratios, so ranks (or micro-batches) with
    # very different masked counts train exactly like one process over the whole batch.
    raw = [to_device(next(batches), w.device) for _ in range(accum)]
    noised = [corrupt(b, cfg.diffusion, step, specials) for b in raw]
    denom = None
    if cfg.diffusion.normalize == "token":
        total = engine.all_reduce_dp(torch.stack([n["counted"].sum() for n in noised]).sum().float())
        denom = total.clamp(min=1) / (w.dp_size * accum)  # the engines average gradients over dp, we over accum
    sums: dict = {"tokens": sum(b["input_ids"].numel() for b in raw), "nonfinite_local": 0}
    loads = None
    for i, batch in enumerate(noised):
        with engine.autocast():
            loss, metrics = diffusion_loss(engine.model, batch, cfg.diffusion, step, specials, denom=denom)
        engine.backward(loss / accum, last_microbatch=i == accum - 1)
        sums["nonfinite_local"] = sums["nonfinite_local"] + (~torch.isfinite(loss.detach())).float()
        router = metrics.pop("router")
        for k, v in metrics.items():
            # tensors are averaged over micro-batches; plain numbers (block_size) are per-step constants
            sums[k] = sums.get(k, 0) + v.detach().float() / accum if torch.is_tensor(v) else v
        loads = [s.load for s in router] if loads is None else [a + s.load for a, s in zip(loads, router)]
    result = engine.step(lr_at(step, cfg))
    # The logged losses are the global batch's, not rank 0's share (one all-reduce); n_masked stays this rank's
    # count per micro-batch (the rehearsal reads it back exactly: its value is known from the batch alone).
    keys = [k for k, v in sums.items() if torch.is_tensor(v) and k not in ("n_masked", "nonfinite_local")]
    if keys and w.dp_size > 1:
        mean = engine.all_reduce_dp(torch.stack([sums[k].reshape(()) for k in keys]), op="mean")
        sums.update(zip(keys, mean.unbind()))
    loads = [engine.all_reduce_dp(l.clone()) for l in loads or []]
    if loads and cfg.model.expert_bias_update_rate > 0 and not result["skipped"]:
        engine.unwrap().update_expert_bias(loads, cfg.model.expert_bias_update_rate)
    if loads:
        sums["router_entropy"] = sum(s.entropy for s in router) / len(router)
        for i, load in enumerate(loads):
            sums[f"expert_load_max_over_mean/layer{i}"] = load.max() / load.mean().clamp_min(1e-9)
    return sums, result, loads


def host_metrics(sums: dict) -> dict[str, float]:
    """Device metric tensors -> floats with one device-to-host copy per step (not one per metric)."""
    keys = [k for k, v in sums.items() if torch.is_tensor(v)]
    values = torch.stack([sums[k].float().reshape(()) for k in keys]).tolist() if keys else []
    return {**{k: float(v) for k, v in sums.items() if not torch.is_tensor(v)}, **dict(zip(keys, values))}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # the noise draws on a GPU come from its own generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train(cfg: Config) -> dict:
    from data_pipeline.loader import build_loader
    from data_pipeline.text_tokenizer import specials_for
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    from training.tracking import Tracker

    stop = _StopFlag()  # first: a pre-timeout signal during start-up must not kill the rank (USR1's default)
    engine = build_engine(cfg)
    w = engine.world
    is_main = w.rank == 0
    run_dir = cfg.run_dir
    if is_main:
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed + w.rank)
    np.random.seed(cfg.train.seed + w.rank)
    random.seed(cfg.train.seed + w.rank)

    accum = engine.global_batch_accum()  # micro-batches per optimizer step on each rank
    loader = build_loader(cfg, seq_len=cfg.train.seq_len, micro_batch_size=cfg.train.micro_batch_size,
                          dp_rank=w.dp_rank, dp_size=w.dp_size, seed=cfg.train.seed,
                          block_size=pad_multiple(cfg.diffusion.block_schedule, cfg.train.seq_len),
                          global_batch_size=cfg.train.global_batch_size)
    batches = iter(loader)
    # token shards carry their special ids and vocab layout (manifest.json): training needs no tokenizer file
    specials = loader.specials_for(cfg.model) if hasattr(loader, "specials_for") else specials_for(cfg)

    ckpts = CheckpointManager(run_dir, keep_last=cfg.train.keep_last)
    start = 0
    resume_from = ckpts.latest_valid() if cfg.train.resume == "auto" else (
        None if cfg.train.resume == "none" else Path(cfg.train.resume))
    nonfinite_run, skipped_total = 0, 0
    if resume_from is not None:
        extra = engine.load(resume_from)
        # the guard's counters are part of the run: a requeued job must still reach max_consecutive_nonfinite
        nonfinite_run, skipped_total = int(extra.get("nonfinite_run", 0)), int(extra.get("skipped_total", 0))
        start = int(extra["step"])
        if "loader" in extra:  # every saved cursor counts the same global rows: another dp size reads any of them
            cursors = extra["loader"]
            loader.load_state_dict(cursors.get(str(w.dp_rank), next(iter(cursors.values()))))
        batches = iter(loader)
        if str(w.rank) in extra.get("rng", {}):
            _set_rng_state(extra["rng"][str(w.rank)])
        if is_main:
            print(f"resumed from {resume_from} at step {start}", file=sys.stderr, flush=True)
    elif cfg.train.init_from:
        engine.load_hf(cfg.train.init_from)

    tracker = Tracker(cfg, run_dir, enabled=is_main)
    model_cfg = engine.unwrap().config
    step = start
    last = {}
    t_prev = time.perf_counter()
    steps_this_run = 0
    for step in range(start, cfg.train.steps):
        lr = lr_at(step, cfg)
        sums, result, loads = train_step(engine, batches, accum, cfg, step, specials)
        sums = host_metrics(sums)
        tokens = int(sums.pop("tokens"))
        local_nonfinite = sums.pop("nonfinite_local") > 0  # this rank's own loss (the logged one is the DP mean)
        skipped = bool(result["skipped"])
        nonfinite_run = nonfinite_run + 1 if skipped else 0
        skipped_total += int(skipped)

        block = block_size_at(cfg.diffusion.block_schedule, step, cfg.train.seq_len)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        global_tokens = tokens * w.dp_size
        achieved = flops_per_token(model_cfg, cfg.train.seq_len, not whole_sequence(block, cfg.train.seq_len),
                                   sums.get("masked_frac", 1.0)) * global_tokens / dt
        last = {**sums, "lr": lr, "grad_norm": result["grad_norm"], "block_size": block,
                "tokens_per_s": global_tokens / dt, "mfu": achieved / (cfg.train.peak_flops * w.world_size),
                "skipped": int(skipped), "skipped_total": skipped_total}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            tracker.log(step, last)
        if nonfinite_run >= cfg.train.max_consecutive_nonfinite:
            tracker.close()
            raise FloatingPointError(
                f"{nonfinite_run} consecutive steps had a non-finite loss or gradient (last at step {step}; "
                f"{_which_ranks(local_nonfinite, w)}); stopping. Lower train.lr (now {cfg.train.lr}) or check the "
                f"data; the last good checkpoint is {ckpts.latest_valid()}")

        steps_this_run += 1
        done = step + 1
        want_stop = _any_rank(stop.raised) or (0 < cfg.train.stop_after <= steps_this_run)
        periodic = cfg.train.save_every > 0 and done % cfg.train.save_every == 0
        if periodic or want_stop or done == cfg.train.steps:
            extra = {"step": done, "loader": {str(w.dp_rank): loader.state_dict()},
                     "rng": {str(w.rank): _rng_state()}, "wandb_run_id": tracker.run_id,
                     "nonfinite_run": nonfinite_run, "skipped_total": skipped_total}
            ckpts.save(engine, done, extra)
            if is_main and loads:  # read by the eval report (expert load plot)
                (run_dir / "expert_load_last.json").write_text(json.dumps([l.tolist() for l in loads]))
        if want_stop:
            if is_main:
                why = f"signal {stop.signum}" if stop.raised else f"train.stop_after={cfg.train.stop_after}"
                print(f"stopping at step {done} ({why}); checkpoint saved, resume with the same command",
                      file=sys.stderr, flush=True)
            break
    tracker.summary({k: v for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    tracker.close()
    if is_main and start >= cfg.train.steps:
        print(f"done: the run had already finished (step {start}/{cfg.train.steps}), run dir {run_dir}",
              file=sys.stderr, flush=True)
    elif is_main:
        print(f"done: step {step + 1}/{cfg.train.steps}, loss {last.get('loss', float('nan')):.4f}, "
              f"skipped {skipped_total}, run dir {run_dir}", file=sys.stderr, flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return last
