"""Two ranks that disagree: one rank killed alone, one rank stuck outside a collective, a NaN on one rank only.
The job must stop, on every rank, within a bounded time and with a message that says what happened, never hang.
(A checkpoint shard missing from one rank's view of the filesystem: tests/test_checkpoint.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.dist_helpers import run_distributed

TINY = ROOT / "configs/model/tiny.yaml"
SMALL = ["data.synthetic=true", "train.seq_len=32", "train.micro_batch_size=1", "train.global_batch_size=2",
         "train.precision=fp32", "train.warmup_steps=1", "train.decay_steps=1", "train.save_every=0",
         "tracking.wandb=disabled"]


def _rank_processes(run_dir: Path) -> dict[int, int]:
    """RANK -> pid of the `launch.cli train` ranks whose command line names this run dir."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        m = argv.index(b"-m") if b"-m" in argv else -2  # a rank: python [-u] -m launch.cli train; torchrun: -m torch.
        if argv[m + 1:m + 3] == [b"launch.cli", b"train"] and f"run.dir={run_dir}".encode() in argv:
            out.update({int(kv[5:]): int(d.name) for kv in env if kv.startswith(b"RANK=")})
    return out


def _wait(cond, timeout_s: float, why):
    deadline = time.time() + timeout_s
    while not (got := cond()):
        assert time.time() < deadline, why()
        time.sleep(0.05)
    return got


@pytest.mark.dist
def test_one_rank_killed_alone_ends_the_job_naming_the_rank(tmp_path):
    """SIGKILL one torchrun worker of `unidiff launch local --nproc 2` mid-run. Measured: rank 0's next collective
    fails at once (gloo: "Connection reset by peer"), torchrun's monitor sees rank 1 exit -9, stops what is left and
    exits 1 with a summary whose root cause is rank 1 (SIGKILL), about 4 s after the kill. No rank may be left."""
    run = tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "launch.log"
    with open(log, "w") as f:  # a file, not a pipe nobody reads while the ranks run
        p = subprocess.Popen([sys.executable, "-m", "launch.cli", "launch", "local", str(TINY), f"run.dir={run}",
                              "run.name=k", "train.steps=500", "train.collective_timeout_s=60", *SMALL, "--nproc",
                              "2"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        metrics = run / "k" / "metrics.jsonl"
        _wait(lambda: (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) or p.poll() is not None, 180,
              lambda: "no step logged")
        assert p.poll() is None, log.read_text()[-3000:]
        ranks = _wait(lambda: (r := _rank_processes(run)) and len(r) == 2 and r, 30, lambda: "ranks not found")
        t0 = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        p.wait(timeout=120)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
    out = log.read_text()
    assert p.returncode != 0, out[-3000:]
    assert took < 60, f"the job took {took:.0f} s to end after a rank was killed"
    cause = out.split("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 1 (local_rank: 1)" in cause and "SIGKILL" in cause, out[-3000:]
    assert not _rank_processes(run), "a rank outlived the job"


def _stuck_peer(rank, world, tmp_path, engine, timeout_s):
    """Rank 1 stays out of the collectives (stuck in I/O, say) until rank 0 reports; rank 0 must fail within the
    configured timeout in the data-parallel group and in the default group, not wait torch's default 30 min."""
    import torch
    from training.config import load_config
    from training.engines import build_engine
    from training.trainer import _any_rank

    cfg = load_config(TINY, [f"train.engine={engine}", f"train.collective_timeout_s={timeout_s}",
                             "parallel.expert=2", *SMALL])
    eng = build_engine(cfg)
    done = tmp_path / "rank0_done"
    if rank == 1:
        _wait(done.exists, 120, lambda: "rank 0 never reported")
        return None
    took = []
    for collective in (lambda: eng.all_reduce_dp(torch.ones(3)), lambda: _any_rank(True)):
        t0 = time.time()
        try:
            collective()
            took.append(("returned", time.time() - t0))
        except RuntimeError as e:
            took.append((str(e).splitlines()[0][-120:], time.time() - t0))
    done.write_text("x")
    return took


@pytest.mark.dist
@pytest.mark.parametrize("engine", ["native", "megatron", "deepspeed"])
def test_a_stuck_peer_fails_the_collective_after_the_configured_timeout(tmp_path, engine):
    """train.collective_timeout_s reaches every process group of each engine. Before, only the default group had
    a timeout (init_process_group's 30 min); groups made by new_group, megatron or deepspeed got torch's 30 min
    default whatever was passed, so a rank would have waited 30 min on a stuck data-parallel peer."""
    timeout_s = 2
    took = run_distributed(_stuck_peer, 2, tmp_path, engine, timeout_s, timeout=180)[0]
    for what, seconds in took:
        assert what != "returned" and "Timed out" in what, took
        assert timeout_s - 0.5 < seconds < timeout_s + 10, took


def _nan_on_rank1(rank, world, tmp_path, extra):
    import training.diffusion as diffusion
    import training.trainer as trainer
    from training.config import load_config

    real_loss, real_step = diffusion.diffusion_loss, trainer.train_step
    skipped = []

    def poisoned(model, batch, cfg, step, specials, generator=None, **kw):
        loss, metrics = real_loss(model, batch, cfg, step, specials, generator, **kw)
        return (loss * float("nan") if rank == 1 and step >= 2 else loss), metrics

    def recorded(engine, batches, accum, cfg, step, specials):
        out = real_step(engine, batches, accum, cfg, step, specials)
        skipped.append((step, bool(out[1]["skipped"])))
        return out

    diffusion.diffusion_loss, trainer.train_step = poisoned, recorded  # this forked rank only
    cfg = load_config(TINY, [*SMALL, f"run.dir={tmp_path}", "run.name=nan", "train.steps=10",
                             "train.max_consecutive_nonfinite=3", "train.collective_timeout_s=30", *extra])
    try:
        trainer.train(cfg)
    except FloatingPointError as e:
        return skipped, str(e)
    return skipped, "no error"


@pytest.mark.dist
@pytest.mark.parametrize("extra", [[], ["parallel.expert=2"]], ids=["dp2", "ep2"])
def test_nan_on_one_rank_skips_the_same_steps_everywhere_and_stops_together(tmp_path, extra):
    """Rank 1's loss is NaN from step 2 on, rank 0's stays finite. The gradient all-reduce (and the grad norm's,
    summed over the world: with EP=2 the expert gradients are not all-reduced) carries the NaN to every rank, so
    every rank skips steps 2, 3, 4 and raises at step 4 together, naming rank 1; one rank going on alone would hang
    the other."""
    res = run_distributed(_nan_on_rank1, 2, tmp_path, extra, timeout=240)
    want = [(0, False), (1, False), (2, True), (3, True), (4, True)]
    assert [r[0] for r in res] == [want, want], res
    for _, msg in res:
        assert ("3 consecutive steps had a non-finite loss or gradient (last at step 4; non-finite loss on rank(s) "
                "[1])") in msg, msg  # the rank whose own loss went bad is named
