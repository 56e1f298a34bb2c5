"""`unidiff quickstart CONFIG`: the whole pipeline on the bundled default, one stage after another.

Each stage is the same `unidiff` command a user would type, run as a child process, so the quickstart exercises
exactly the public entry points. Every stage is resumable (finished shards are skipped, training resumes from its
latest checkpoint), so rerunning after an interruption picks up where it stopped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launch.config import redact_override


def stages(config: str, overrides: list[str], cfg) -> list[tuple[str, list[str]]]:
    """(title, unidiff argv) for each stage, in order."""
    c = [config, *overrides]
    return [
        ("make sample data", ["data", "make-sample", cfg.data.raw_dir, *c]),
        ("fit image codebook", ["tokenizer", "fit-codebook", *c]),
        ("pretokenize", ["pretokenize", *c]),
        (f"train backbone ({cfg.launch.nproc} processes, expert parallel {cfg.parallel.expert})",
         ["launch", "local", *c, "--nproc", str(cfg.launch.nproc)]),
        ("train decoder", ["train-decoder", *c]),
        ("distill decoder", ["distill", *c]),
        ("evaluate", ["eval", *c]),
    ]


def run_stages(todo: list[tuple[str, list[str]]], log_dir: Path, secrets: dict[str, str] | None = None) -> list[dict]:
    """`secrets` (launch.env values the stages' words show redacted) go to each stage through its environment."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done = []
    t_all = time.perf_counter()
    for i, (title, argv) in enumerate(todo, 1):
        print(f"\n[{i}/{len(todo)}] {title}: unidiff {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "launch.cli", *argv], env={**os.environ, **(secrets or {})})
        dt = time.perf_counter() - t0
        done.append({"stage": title, "seconds": round(dt, 1), "rc": r.returncode})
        (log_dir / "stages.json").write_text(json.dumps(done, indent=1))
        if r.returncode != 0:
            print(f"quickstart: stage '{title}' failed with exit code {r.returncode} after {dt:.0f}s; "
                  f"fix it and rerun the same command (finished work is kept)", file=sys.stderr)
            break
        print(f"[{i}/{len(todo)}] {title}: done in {dt:.0f}s (total {time.perf_counter() - t_all:.0f}s)", flush=True)
    return done


def print_summary(cfg, done: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="quickstart stages")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    t.add_column("status")
    for d in done:
        t.add_row(d["stage"], f"{d['seconds']:.0f}", "ok" if d["rc"] == 0 else f"FAILED ({d['rc']})")
    console.print(t)
    report = cfg.run_dir / "eval" / "report.json"
    if report.exists():
        rep = json.loads(report.read_text())
        s = Table(title="evaluation (score vs chance / baseline)")
        for col in ("task", "metric", "score", "baseline"):
            s.add_column(col)
        for row in rep.get("summary", []):
            s.add_row(str(row.get("task")), str(row.get("metric")), _num(row.get("score")), _num(row.get("baseline")))
        console.print(s)
        console.print(f"report: {report.parent / 'report.md'}")


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def cmd_quickstart(cfg, args) -> int:
    config = next((w for w in args.words if w.endswith((".yaml", ".yml"))), None)
    overrides = [redact_override(w) for w in args.words if "=" in w]
    done = run_stages(stages(config, overrides, cfg), cfg.run_dir, cfg.launch.secrets())
    print_summary(cfg, done)
    return 0 if done and all(d["rc"] == 0 for d in done) and len(done) == len(stages(config, overrides, cfg)) else 1
