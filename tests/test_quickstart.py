"""`unidiff quickstart` end to end (reduced sizes): every stage through the public CLI, then the report."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

# Same pipeline and model as `make quickstart`, fewer steps and held-out items so CI stays fast.
REDUCED = ["train.steps=80", "train.warmup_steps=10", "train.decay_steps=20", "train.save_every=40",
           "decoder.train_steps=60", "decoder.warmup_steps=10", "decoder.save_every=30", "distill.train_steps=30", "distill.pool_size=32",
           "data.sample.train_scenes=600", "data.sample.val_scenes=64", "data.sample.train_docs=40",
           "data.sample.val_docs=8", "data.image_tokenizer.kmeans_iters=10", "eval.num_samples=16",
           "eval.speed_repeats=1",
           # the image-blind control is a second pass over the understanding items: tests/test_evals_* check it
           "eval.image_blind=false"]


@pytest.mark.timeout(1800)
def test_quickstart_runs_every_stage_and_writes_a_report(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, "-m", "launch.cli", "quickstart",
                        str(ROOT / "configs/experiments/quickstart.yaml"), *REDUCED],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs/quickstart"
    stages = json.loads((run / "stages.json").read_text())
    assert [s["rc"] for s in stages] == [0] * 7
    report = json.loads((run / "eval/report.json").read_text())
    status = {t: v["status"] for t, v in report["tasks"].items()}
    assert status == {t: "ok" for t in ("elbo", "choice", "vqa", "caption", "t2i", "reconstruction", "speed")}
    elbo = report["tasks"]["elbo"]
    assert elbo["scores"]["nelbo_per_token"] < 0.7 * elbo["baselines"]["nelbo_per_token"]  # learned something
    assert (run / "eval/report.md").read_text().startswith("# unidiff eval report")
    assert list((run / "eval").glob("*.png"))
    assert (run / "checkpoints/latest").exists() and (run / "distill/checkpoints/latest").exists()
    assert "report:" in r.stdout
