"""The real `unidiff train` (tiny config, synthetic data, 2 nodes x 1 rank on gloo) as a SLURM job of the test cluster
(tests/slurm_cluster.py): an uninterrupted job, and the ways a job is stopped and continued: a pre-timeout signal
that requeues it (once, and three times in a chain from SLURM's own timer) and an external `scontrol requeue`
(SIGTERM). Each interrupted job must end with the uninterrupted job's per-step losses and one wandb run.

Durations on the 2-core test machine: see docs/slurm.md, "Tests against a real SLURM".
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: the real cluster)
from tests.slurm_jobs import (FINAL, ROOT, TINY, job_logs, lines, master_port, rank_pids, slurm_env,  # noqa: F401
                              slurm_env_vars, wait_until)

pytestmark = pytest.mark.xdist_group("slurm")
STEPS = 20  # tiny model, ~0.15-0.3 s per step on 2 cores: a signal lands mid-run


def _train_overrides(base: Path, name: str, steps: int) -> list[str]:
    return [f"run.dir={base}", f"run.name={name}", "data.synthetic=true", f"train.steps={steps}",
            "train.seq_len=32", "train.micro_batch_size=1", "train.global_batch_size=2", "train.precision=fp32",
            "train.warmup_steps=2", "train.decay_steps=2", "train.save_every=2", "train.seed=3",
            "tracking.wandb=offline", master_port()]


def _submit(env: dict, base: Path, name: str, *flags: str) -> str:
    """`unidiff launch slurm` through the real CLI; returns the job id."""
    r = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "slurm", str(TINY),
                        *_train_overrides(base, name, STEPS), "--nodes", "2", *flags], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("submitted job ")[1].split(":")[0]


def _submit_and_wait_for_steps(cluster, base: Path, name: str) -> tuple[Path, str, str]:
    """Submit the training job and wait until it has logged 3 steps: (run dir, job id, wandb run id)."""
    run_dir = base / name
    job = _submit(dict(os.environ), base, name)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: lines(metrics) >= 3 or cluster.job(job).get("JobState") in FINAL, 240,
               lambda: job_logs(run_dir))
    return run_dir, job, (run_dir / "wandb_run_id").read_text().strip()


def _losses(run_dir: Path) -> dict[int, float]:
    """Last logged loss per step (a step re-run after a resume overwrites the earlier line)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def _resumes(run_dir: Path, job: str) -> list[int]:
    text = (run_dir / "slurm" / f"{job}.rank0.log").read_text(errors="replace")
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]


def _same_losses_and_one_wandb_run(run_dir: Path, ref_dir: Path, run_id: str, segments: int) -> None:
    got, want = _losses(run_dir), _losses(ref_dir)
    assert sorted(got) == list(range(STEPS)), job_logs(run_dir)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (got, want)
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == segments and all(p.name.endswith(run_id) for p in runs), runs  # one run, `segments` parts


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tmp_path_factory):  # noqa: F811
    """A 2-node job made by `unidiff launch slurm` trains the tiny config with gloo; the reference for the tests
    that stop and continue the same training."""
    base = tmp_path_factory.mktemp("train")
    job = _submit(slurm_env_vars(slurm_cluster), base, "ref")
    info = slurm_cluster.wait_state(job, FINAL, timeout_s=300)
    return base / "ref", info


@pytest.mark.slurm
def test_two_node_job_trains_and_checkpoints(uninterrupted):
    run_dir, info = uninterrupted
    logs = job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", logs
    assert sorted(_losses(run_dir)) == list(range(STEPS)), logs
    assert (run_dir / "checkpoints" / "latest").exists(), logs
    assert (run_dir / "wandb_run_id").read_text().strip(), logs
    assert "rank 0 at 127.0.0.1" in logs  # rendezvous address from the head node's NodeAddr
    assert (run_dir / "slurm" / "train.sbatch").exists() and (run_dir / "slurm" / "config.yaml").exists()


@pytest.mark.slurm
def test_preempted_job_resumes_with_identical_losses_and_wandb_run(slurm_env, uninterrupted, tmp_path):
    """Signal the batch shell mid-run exactly as `--signal=B:USR1@lead` does at the pre-timeout point; the ranks
    save, the job requeues itself, resumes from `latest`, and ends with the uninterrupted losses."""
    cluster = slurm_env
    run_dir, job, run_id = _submit_and_wait_for_steps(cluster, tmp_path, "pre")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = cluster.wait_state(job, FINAL, timeout_s=300)
    logs = job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    assert "got SIGUSR1" in logs and "requeueing job" in logs, logs
    [resumed_at] = _resumes(run_dir, job)
    assert 0 < resumed_at < STEPS - 2, f"the stop should land mid-run (resumed at {resumed_at} of {STEPS})"
    _same_losses_and_one_wandb_run(run_dir, uninterrupted[0], run_id, segments=2)


@pytest.mark.slurm
def test_three_pre_timeout_signals_from_the_slurm_timer_chain_three_requeues(slurm_env, uninterrupted, tmp_path):
    """One job, four segments: SLURM's own timer (`--time 2 --signal-lead 80`, so `#SBATCH --time=2
    --signal=B:USR1@80`) signals the batch shell before the limit of each of the first three segments; each time
    the ranks save, the script requeues the job (same id, SLURM_RESTART_COUNT 1, 2, 3), the next segment resumes
    from `latest`. The fourth gets a longer limit (`scontrol update TimeLimit=10` while it is pending) and
    finishes. It must end with the uninterrupted losses and one wandb run.

    slurmctld checks limits every 30 s and sends the signal at the first check that is at most lead + 30 s before
    the limit, here 10 to 40 s after the segment started (measured: it re-arms for every requeued segment).
    How many steps the ranks train in that time depends on the machine (startup takes 6-15 s, a step 0.1-0.3 s),
    so once a segment has logged a step the test SIGSTOPs its two rank processes and SIGCONTs them as soon as the
    batch shell logs the signal: to the ranks it is one slow step; the signal, forwarded by the trap through srun,
    waits pending and is handled at SIGCONT. A signal that comes during start-up instead (before a step is
    logged) is handled too: the rank trains one step and saves (launch/cli.py EarlySignals)."""
    cluster = slurm_env
    run_dir = tmp_path / "chain"
    job = _submit(dict(os.environ), tmp_path, "chain", "--time", "2", "--signal-lead", "80")
    out, metrics = run_dir / "slurm" / f"{job}.out", run_dir / "metrics.jsonl"
    config = run_dir / "slurm" / "config.yaml"

    def signals() -> int:
        return out.read_text().count("got SIGUSR1") if out.exists() else 0

    def restarts() -> int:
        info = cluster.job(job)
        assert info.get("JobState") not in FINAL, job_logs(run_dir)
        return int(info.get("Restarts", "0"))

    run_id = ""
    for k in range(3):  # segment k runs with SLURM_RESTART_COUNT=k
        logged = lines(metrics)  # segment k-1 exited before its requeue: nothing of segment k is logged yet
        stopped: list[int] = []
        try:
            def signalled() -> bool:
                if not stopped and lines(metrics) > logged:  # segment k trains: freeze it until the signal
                    stopped.extend(rank_pids(config))
                    assert len(stopped) == 2, (stopped, job_logs(run_dir))
                    for pid in stopped:
                        os.kill(pid, signal.SIGSTOP)
                return signals() > k or restarts() > k  # > k: a rank saw it before its step was logged
            wait_until(signalled, 150, lambda: f"segment {k}: no pre-timeout signal\n{job_logs(run_dir)}", 0.05)
        finally:
            for pid in stopped:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        wait_until(lambda: restarts() > k, 120, lambda: f"segment {k} did not requeue\n{job_logs(run_dir)}", 0.1)
        run_id = run_id or (run_dir / "wandb_run_id").read_text().strip()
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")  # still pending (cred_expire = 10 s)
    info = cluster.wait_state(job, FINAL, timeout_s=240)
    logs = job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "3", logs
    text = out.read_text()
    assert text.count("got SIGUSR1") == 3 and text.count("requeueing job") == 3, text
    assert [f"(restart {k})" in text for k in range(4)] == [True] * 4, text
    resumed = _resumes(run_dir, job)
    assert len(resumed) == 3 and 0 < resumed[0] < resumed[1] < resumed[2] < STEPS, (resumed, logs)
    _same_losses_and_one_wandb_run(run_dir, uninterrupted[0], run_id, segments=4)


@pytest.mark.slurm
def test_external_scontrol_requeue_saves_on_sigterm_and_resumes(slurm_env, uninterrupted, tmp_path):
    """`scontrol requeue JOB` on a running job (an admin; preemption with PreemptMode=REQUEUE does the same):
    SLURM sends SIGTERM to every process of the job, kills what is left after KillWait (10 s here) and queues the
    job again. The ranks must save at the end of the step they are in (signal 15), exit 0, and the requeued job
    must resume from that checkpoint (not an older periodic one) and end with the uninterrupted losses.

    Measured before the fix: wandb's service process (wandb-core) got the same SIGTERM and exited, rank 0's next
    `wandb.log` raised ConnectionResetError, rank 0 died before saving and rank 1 with "Connection closed by
    peer"; the job restarted from the last periodic checkpoint. The tracker now goes on without wandb."""
    cluster = slurm_env
    run_dir, job, run_id = _submit_and_wait_for_steps(cluster, tmp_path, "ext")
    cluster.run("scontrol", "requeue", job)
    info = cluster.wait_state(job, FINAL, timeout_s=300)
    logs = job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    text = (run_dir / "slurm" / f"{job}.out").read_text()
    assert "got SIGTERM" in text and "requeueing job" not in text, text  # SLURM requeued it, not the script
    rank0 = (run_dir / "slurm" / f"{job}.rank0.log").read_text(errors="replace")
    saved = re.search(r"stopping at step (\d+) \(signal 15\); checkpoint saved", rank0)
    assert saved, logs
    assert _resumes(run_dir, job) == [int(saved.group(1))], logs
    assert "ranks exited with 0" in text.split("(restart 1)")[0], text
    _same_losses_and_one_wandb_run(run_dir, uninterrupted[0], run_id, segments=2)
