"""`unidiff launch local CONFIG --nproc N`: torchrun on this machine, through the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/model/tiny.yaml"


def unidiff(*words, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, words)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.unit
def test_dry_run_shows_the_torchrun_command():
    r = unidiff("launch", "local", TINY, "train.steps=3", "--nproc", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    for part in ("-m torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m launch.cli train",
                 str(TINY), "train.steps=3"):
        assert part in line, (part, line)


@pytest.mark.unit
def test_layout_that_cannot_use_the_ranks_fails_before_starting():
    r = unidiff("launch", "local", TINY, "parallel.tensor=2", "--nproc", "3", "--dry-run")
    assert r.returncode == 2 and "not divisible by parallel.tensor" in r.stderr, r.stderr
    r = unidiff("launch", "local", TINY, "--nproc", "4", "--dry-run")  # global 4 / micro 2 = 2 DP ranks at most
    assert r.returncode == 2 and "at most 2 data-parallel ranks" in r.stderr, r.stderr
    r = unidiff("launch", "local", TINY, "--nproc", "2", "--command", "nope", "--dry-run")
    assert r.returncode == 2 and "not a unidiff command" in r.stderr, r.stderr


@pytest.mark.dist
def test_torchrun_starts_every_rank():
    """Two real ranks of a command that needs no process group: each prints once."""
    r = unidiff("launch", "local", TINY, "--nproc", "2", "--command", "model info", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("total_params:") == 2, r.stdout


@pytest.mark.dist
def test_two_rank_training_writes_checkpoints_and_metrics(tmp_path):
    r = unidiff("launch", "local", TINY, f"run.dir={tmp_path}", "run.name=loc", "data.synthetic=true",
                "train.steps=4", "train.seq_len=32", "train.micro_batch_size=1", "train.global_batch_size=2",
                "train.precision=fp32", "train.warmup_steps=1", "train.decay_steps=1", "train.save_every=2",
                "tracking.wandb=offline", "--nproc", "2", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "loc" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert (tmp_path / "loc" / "checkpoints" / "latest").exists()
