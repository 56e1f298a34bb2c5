"""Experiment tracking: one line per step to the console and `metrics.jsonl`, and to wandb (offline by default).

The wandb run id is created once and stored in the run dir (`wandb_run_id`), so a resumed or requeued job continues
the same wandb run. Only rank 0 logs; other ranks get a no-op tracker.

wandb runs a service process of its own (wandb-core). When SLURM ends or requeues a job (scancel, preemption,
`scontrol requeue`, the time limit) it sends SIGTERM to every process of the job step, that service included, and
the service exits at once; the trainer meanwhile finishes its step and saves. A wandb call that fails then must not
take the checkpoint with it: the tracker says so in one line and goes on without wandb (metrics.jsonl has every step).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path


class Tracker:
    def __init__(self, cfg, run_dir: Path, enabled: bool = True, job_type: str = "train"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.run_id = ""
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", buffering=1)
        if cfg.tracking.wandb != "disabled":
            self._start_wandb(cfg, job_type)

    def _start_wandb(self, cfg, job_type: str) -> None:
        import wandb

        id_file = self.run_dir / "wandb_run_id"
        run_id = (cfg.tracking.run_id or (id_file.read_text().strip() if id_file.exists() else "")
                  or secrets.token_hex(4))
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        from training.config import to_dict

        self.wandb = wandb.init(project=cfg.tracking.project, entity=cfg.tracking.entity or None, id=run_id,
                                resume="allow", mode=cfg.tracking.wandb, dir=str(self.run_dir),
                                name=cfg.run.name, job_type=job_type, config=to_dict(cfg),
                                settings=wandb.Settings(console="off", x_disable_stats=True))
        self.run_id = run_id

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v)
                 for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self._wandb("log", lambda run: run.log(clean, step=step))
        if console:
            keys = [k for k in ("loss", "loss_text", "loss_image", "lr", "grad_norm", "block_size", "tokens_per_s",
                                "mfu", "skipped") if k in clean]
            print(f"step {step:>6} " + " ".join(f"{k}={_fmt(clean[k])}" for k in keys), file=sys.stderr, flush=True)

    def summary(self, values: dict) -> None:
        def put(run):
            for k, v in values.items():
                run.summary[k] = v
        self._wandb("summary", put)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._wandb("finish", lambda run: run.finish())
        self.wandb = None

    def _wandb(self, what: str, call) -> None:
        if self.wandb is None:
            return
        try:
            call(self.wandb)
        except Exception as e:  # measured: ConnectionResetError("Connection lost") once wandb-core got SIGTERM
            self.wandb = None
            try:  # unregisters wandb's atexit hook first, which would print the same error again at exit
                import wandb
                wandb.teardown()
            except Exception:
                pass
            print(f"tracking: wandb {what} failed ({type(e).__name__}: {e}); wandb is off for the rest of this run "
                  f"(its service process probably got the job's SIGTERM), metrics.jsonl goes on", file=sys.stderr,
                  flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) and math.isfinite(v):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def read_metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def read_wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the newest wandb run under run_dir, read back from the offline `.wandb` file (no server),
    with wandb's own reader (`wandb leet inspect --json`, wandb >= 0.31)."""
    import shutil
    import subprocess

    files = sorted(Path(run_dir).glob("wandb/*run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no wandb run file under {run_dir}/wandb")
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    rows = []
    for f in files:
        out = subprocess.run([exe, "leet", "inspect", "--json", str(f)], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            rec = json.loads(line) if line.startswith("{") else {}
            if rec.get("type") == "history":
                rows.append(rec["history"]["item"])
    return rows
