"""bench/gpu_check.py --cpu: the one-shot GPU check's code path at toy size on CPU, so it still runs when a GPU
is finally lent. Every check must be present and pass, and every figure in the JSON must be a finite number."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

CHECKS = ["model_fwd_bwd", "flex_vs_dense", "grouped_mm", "train_native", "train_megatron", "train_deepspeed",
          "throughput"]
MAY_BE_NULL = {"max_memory_allocated_gib"}  # CUDA-only figures


def _numbers(obj, path=""):
    """(dotted path, value) of every number (and None) in a JSON tree; bools are not numbers."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif obj is None or (isinstance(obj, (int, float)) and not isinstance(obj, bool)):
        yield path, obj


def test_cpu_mode_runs_every_check_and_writes_the_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert sum(line.startswith("PASS ") for line in lines) == len(CHECKS), r.stdout
    assert lines[-1].startswith(f"gpu_check: {len(CHECKS)}/{len(CHECKS)} passed on cpu"), r.stdout

    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["cpu_mode"] is True and rep["ok"] is True
    assert rep["torch"] and rep["wall_s"] > 0
    by_name = {c["name"]: c for c in rep["checks"]}
    assert list(by_name) == CHECKS
    for c in rep["checks"]:
        assert c["ok"] is True, c
        assert "error" not in c, c
    for path, v in _numbers(rep):
        if v is None:
            assert path.rsplit(".", 1)[-1] in MAY_BE_NULL, path
        else:
            assert math.isfinite(v), (path, v)

    m = by_name["model_fwd_bwd"]
    assert m["precision"] == "fp32" and m["flex"] is False and m["zero_grad_params"] == []
    f = by_name["flex_vs_dense"]
    assert f["backward"] is False  # no FlexAttention backward on CPU
    for case in ("block_diffusion", "mdlm"):
        assert f[f"{case}_out_rel_diff"] <= f["tolerance_rel"]
    g = by_name["grouped_mm"]
    assert g["grouped_mm_used"] is True
    assert all(g[f"{k}_rel_diff"] <= g["tolerance_rel"] for k in ("out", "dx", "d_gate_proj", "d_up_proj",
                                                                   "d_down_proj"))
    for engine in ("native", "megatron", "deepspeed"):
        t = by_name[f"train_{engine}"]
        assert t["resumed_at_step"] == t["stop_after"]
        assert t["pre_stop_exact"] and t["post_resume_exact"] and t["loss_max_abs_diff"] == 0.0
        assert t["whole_rc"] == t["first_rc"] == t["resumed_rc"] == 0
    assert by_name["train_native"]["init_distributed_backend_world1"] == "none"
    tp = by_name["throughput"]
    assert tp["peak_is_nominal"] is True and tp["tokens_per_s"] > 0 and 0 < tp["mfu"]
    assert tp["block_size"] < 128  # block diffusion (x_t || x_0), not MDLM
