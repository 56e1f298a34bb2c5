"""The training loop: exact resume after a stop or a signal, wandb offline read-back, the non-finite guard."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from tests.dist_helpers import run_distributed
from training.config import load_config
from training.tracking import read_metrics, read_wandb_history

TINY = ROOT / "configs/model/tiny.yaml"
BASE = ["data.synthetic=true", "train.seq_len=64", "train.steps=8", "train.warmup_steps=2", "train.decay_steps=3",
        "train.save_every=0", "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=fp32",
        "diffusion.block_schedule=[[0,16],[4,0]]"]


def _cfg(tmp_path, name, *extra):
    return load_config(TINY, [*BASE, f"run.dir={tmp_path}", f"run.name={name}", *extra])


def _losses(run_dir):
    rows = read_metrics(run_dir)
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows}


def _train(cfg):
    from training.trainer import train

    return train(cfg)


@pytest.mark.unit
def test_stop_and_resume_gives_bit_identical_losses(tmp_path):
    _train(_cfg(tmp_path, "whole", "tracking.wandb=disabled"))
    _train(_cfg(tmp_path, "split", "tracking.wandb=disabled", "train.stop_after=3"))
    assert sorted(_losses(tmp_path / "split")) == [0, 1, 2]
    _train(_cfg(tmp_path, "split", "tracking.wandb=disabled"))  # train.resume=auto picks up step 3
    whole, split = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert sorted(split) == list(range(8))
    assert split == whole  # exact float equality, step by step, across the block-size switch at step 4


def _dist_train(rank, world, tmp_path, name, extra):
    cfg = _cfg(tmp_path, name, "tracking.wandb=disabled", "parallel.expert=2", *extra)
    _train(cfg)
    return True


@pytest.mark.dist
def test_expert_parallel_stop_and_resume_matches_uninterrupted(tmp_path):
    run_distributed(_dist_train, 2, tmp_path, "whole", [])
    run_distributed(_dist_train, 2, tmp_path, "split", ["train.stop_after=5"])
    run_distributed(_dist_train, 2, tmp_path, "split", [])
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


@pytest.mark.e2e
def test_sigterm_saves_and_the_rerun_resumes_with_the_same_wandb_run(tmp_path):
    words = [sys.executable, "-m", "launch.cli", "train", str(TINY), *BASE, "train.steps=40",
             f"run.dir={tmp_path}", "run.name=sig"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(words, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # wait until it is really training, then preempt it like SLURM does
        seen.append(line)
        if line.startswith("step      3"):
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, "".join(seen) + rest
    assert "checkpoint saved" in rest
    run_dir = tmp_path / "sig"
    first = _losses(run_dir)
    stopped_at = max(first) + 1
    assert 4 <= stopped_at < 40
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    r = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"at step {stopped_at}" in r.stderr
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert sorted(_losses(run_dir)) == list(range(40))
    history = read_wandb_history(run_dir)  # the metrics really went to wandb, both before and after the resume
    by_step = {int(h["_step"]): h for h in history}
    assert set(by_step) == set(range(40))
    jsonl = _losses(run_dir)
    for step in (0, stopped_at - 1, stopped_at, 39):
        assert by_step[step]["loss"] == pytest.approx(jsonl[step][0])
    assert all(run_id in p.name for p in run_dir.glob("wandb/*run-*"))


@pytest.mark.unit
def test_non_finite_steps_are_skipped_then_stop_with_a_clear_message(tmp_path, monkeypatch):
    import training.diffusion as diffusion

    real = diffusion.diffusion_loss
    calls = {"n": 0}

    def poisoned(model, batch, cfg, step, specials, generator=None, **kw):
        loss, metrics = real(model, batch, cfg, step, specials, generator, **kw)
        calls["n"] += 1
        return (loss * float("nan") if step >= 2 else loss), metrics

    monkeypatch.setattr(diffusion, "diffusion_loss", poisoned)
    cfg = _cfg(tmp_path, "nan", "tracking.wandb=disabled", "train.max_consecutive_nonfinite=3")
    with pytest.raises(FloatingPointError, match="3 consecutive steps had a non-finite loss"):
        _train(cfg)
    rows = read_metrics(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[-1]["skipped_total"] == 3


@pytest.mark.unit
def test_non_finite_guard_counts_across_a_resume(tmp_path, monkeypatch):
    """The guard's counters live in the checkpoint: a job stopped and requeued between non-finite steps still stops
    after max_consecutive_nonfinite of them in a row (a requeued job must not reset the count and run forever)."""
    import training.diffusion as diffusion

    real = diffusion.diffusion_loss

    def poisoned(model, batch, cfg, step, specials, generator=None, **kw):
        loss, metrics = real(model, batch, cfg, step, specials, generator, **kw)
        return (loss * float("nan") if step >= 2 else loss), metrics

    monkeypatch.setattr(diffusion, "diffusion_loss", poisoned)
    args = ("tracking.wandb=disabled", "train.max_consecutive_nonfinite=3")
    _train(_cfg(tmp_path, "nan", *args, "train.stop_after=3"))  # steps 0..2: one non-finite, then a stop
    with pytest.raises(FloatingPointError,
                       match=r"3 consecutive steps .* \(last at step 4; non-finite loss on rank\(s\) \[0\]\)"):
        _train(_cfg(tmp_path, "nan", *args))
    rows = read_metrics(tmp_path / "nan")
    assert [(r["step"], r["skipped_total"]) for r in rows][-2:] == [(3, 2), (4, 3)]


# t = 1 masks every maskable token: the masks no longer depend on each rank's RNG, so runs of different
# data-parallel sizes over the same global batches give the same losses (with "token" normalisation over the batch)
_SAME_MASKS = ["diffusion.mask_low=1.0", "diffusion.mask_high=1.0", "diffusion.normalize=token"]


def _dp_train(rank, world, tmp_path, name, extra):
    _train(_cfg(tmp_path, name, "tracking.wandb=disabled", *_SAME_MASKS, *extra))
    return True


@pytest.mark.dist
def test_elastic_resume_continues_the_global_sample_order(tmp_path):
    """Saved at 2 data-parallel ranks, resumed in 1 process (and the other way round): no KeyError/ValueError,
    and the resumed steps see the same global batches as the uninterrupted 2-rank run (equal losses, fp32)."""
    run_distributed(_dp_train, 2, tmp_path, "whole", [])
    run_distributed(_dp_train, 2, tmp_path, "shrink", ["train.stop_after=3"])
    _train(_cfg(tmp_path, "shrink", "tracking.wandb=disabled", *_SAME_MASKS))
    _train(_cfg(tmp_path, "grow", "tracking.wandb=disabled", *_SAME_MASKS, "train.stop_after=5"))
    run_distributed(_dp_train, 2, tmp_path, "grow", [])
    whole = _losses(tmp_path / "whole")
    assert sorted(whole) == list(range(8))
    for name in ("shrink", "grow"):
        got = _losses(tmp_path / name)
        assert sorted(got) == list(range(8)), name
        for step, (loss, gnorm) in whole.items():
            assert got[step][0] == pytest.approx(loss, rel=1e-5), (name, step)
            assert got[step][1] == pytest.approx(gnorm, rel=1e-4), (name, step)


# ---- the same loop under megatron-core and DeepSpeed ---------------------------------------------------------------
def _engine_train(rank, world, tmp_path, name, engine, extra, poison_from=None):
    if poison_from is not None:  # a non-finite loss on rank 1 only: every rank must skip the same steps
        import training.diffusion as diffusion
        real = diffusion.diffusion_loss

        def poisoned(model, batch, cfg, step, specials, generator=None, **kw):
            loss, metrics = real(model, batch, cfg, step, specials, generator, **kw)
            return (loss * float("nan") if step >= poison_from and rank == 1 else loss), metrics

        diffusion.diffusion_loss = poisoned
    cfg = _cfg(tmp_path, name, f"train.engine={engine}", "parallel.expert=2", "train.steps=6", *extra)
    try:
        _train(cfg)
    except FloatingPointError as e:
        return str(e)
    return None


@pytest.mark.dist
@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_trainer_under_engine_resumes_exactly_and_guards_non_finite(tmp_path, engine):
    """The trainer's invariants on the other engines (EP=2 on 2 gloo ranks): stop after 3 steps + resume equals
    the uninterrupted run exactly, the metrics went to wandb (offline, read back), and a NaN on one rank only makes
    every rank skip the same steps and stop together with the guard's message."""
    run_distributed(_engine_train, 2, tmp_path, "whole", engine, ["tracking.wandb=offline"], timeout=400)
    run_distributed(_engine_train, 2, tmp_path, "split", engine, ["tracking.wandb=disabled", "train.stop_after=3"],
                    timeout=400)
    assert sorted(_losses(tmp_path / "split")) == [0, 1, 2]
    run_distributed(_engine_train, 2, tmp_path, "split", engine, ["tracking.wandb=disabled"], timeout=400)
    whole = _losses(tmp_path / "whole")
    assert sorted(whole) == list(range(6)) and _losses(tmp_path / "split") == whole
    history = {int(h["_step"]): h["loss"] for h in read_wandb_history(tmp_path / "whole")}
    assert history == pytest.approx({s: loss for s, (loss, _) in whole.items()})
    out = run_distributed(_engine_train, 2, tmp_path, "nan", engine,
                          ["tracking.wandb=disabled", "train.max_consecutive_nonfinite=2"], poison_from=2, timeout=400)
    assert out[0] == out[1] and "2 consecutive steps" in out[0], out
    assert "(last at step 3; non-finite loss on rank(s) [1])" in out[0], out  # the rank with the bad loss
    rows = read_metrics(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1]


@pytest.mark.unit
@pytest.mark.parametrize("pad", [True, False])
def test_pad_to_block_reaches_the_training_loader(tmp_path, monkeypatch, pad):
    """data.pad_to_block did nothing in training (the trainer passed no block size to the loader): now every
    document of a training batch spans whole blocks of the schedule's sizes (16 here), or not when it is off."""
    import data_pipeline.loader as loader_mod
    made = []

    def recording(*a, **kw):
        made.append(real(*a, **kw))
        return made[-1]

    real = loader_mod.build_loader
    monkeypatch.setattr(loader_mod, "build_loader", recording)
    _train(_cfg(tmp_path, f"pad{pad}", "tracking.wandb=disabled", "train.steps=1", f"data.pad_to_block={pad}"))
    batch = made[0].make_batch(0, 0)
    spans = [int((batch["doc_ids"][r] == d).sum()) for r in range(batch["doc_ids"].shape[0])
             for d in batch["doc_ids"][r].unique().tolist() if d >= 0]
    assert made[0].block_size == (16 if pad else None)
    assert all(n % 16 == 0 for n in spans) == pad, spans
