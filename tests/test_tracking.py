"""The tracker when wandb goes away under it (training/tracking.py)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from training.config import load_config
from training.tracking import Tracker, read_metrics


def _children(name: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            argv0 = (d / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and argv0.endswith(name.encode()):
            out.append(int(d.name))
    return out


@pytest.mark.unit
def test_a_dead_wandb_service_turns_wandb_off_and_the_run_goes_on(tmp_path, capsys):
    """SLURM's SIGTERM to a job step (scancel, preemption, `scontrol requeue`) reaches wandb's service process too;
    measured: wandb-core exits at once and every later wandb call raises ConnectionResetError. Before, that
    exception killed rank 0 in the middle of the step it had to finish and save (tests/test_slurm_train.py,
    external requeue). Now the tracker says so once and keeps writing metrics.jsonl; close() still works."""
    cfg = load_config(ROOT / "configs/model/tiny.yaml", ["tracking.wandb=offline"])
    tracker = Tracker(cfg, tmp_path / "run")
    tracker.log(0, {"loss": 1.0})
    [service] = _children("wandb-core")
    os.kill(service, signal.SIGTERM)
    deadline = time.time() + 30
    while _children("wandb-core"):
        assert time.time() < deadline, "wandb-core ignored SIGTERM"
        time.sleep(0.02)
    tracker.log(1, {"loss": 2.0})
    tracker.log(2, {"loss": 3.0})
    tracker.summary({"loss": 3.0})
    tracker.close()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("tracking: wandb log failed (ConnectionResetError") == 1, err
    assert "wandb is off for the rest of this run" in err
