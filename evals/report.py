"""The eval report: `report.json` (everything, machine-readable), `report.md` (tables + PNG figures), and the
same numbers logged to wandb through `training.tracking.Tracker` (job_type "eval")."""
from __future__ import annotations

import json
import math
from pathlib import Path

from evals.context import TaskResult

CONTROLS = ("answer_prior", "image_blind")  # the understanding tasks' controls beside chance (evals/controls.py)
HEADLINE = {"elbo": "nelbo_per_token", "choice": "accuracy", "vqa": "accuracy", "caption": "f1", "t2i": "overall",
            "reconstruction": None, "speed": "text/tokens_per_forward"}


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def headline(r: TaskResult) -> tuple[str, str, str]:
    """(metric, score, baseline) for the summary table."""
    key = HEADLINE.get(r.name)
    if key is None or key not in r.scores:
        key = next((k for k in r.scores if k not in ("items", "mc")), None)
    if key is None:
        return "", "", ""
    base = r.baselines.get(key, next((v for k, v in r.baselines.items() if k.endswith(key.split("/")[-1])), ""))
    return key, _fmt(r.scores[key]), _fmt(base)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return out


def to_markdown(results: list[TaskResult], meta: dict, figures: dict[str, str]) -> str:
    lines = ["# unidiff eval report", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += ["", "## Summary", "", "| task | status | metric | score | baseline / chance | answer prior | image-blind "
              "| seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, s, b = headline(r)
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        controls = " | ".join(_fmt(r.baselines.get(k, "")) for k in CONTROLS)
        lines.append(f"| {r.name} | {status} | {m} | {s} | {b} | {controls} | {r.seconds:.1f} |")
    for r in results:
        lines += ["", f"## {r.name}", ""]
        if r.status != "ok":
            lines += [f"{r.status}: {r.reason}"]
            continue
        keys = list(dict.fromkeys(list(r.scores) + list(r.baselines)))
        lines += _table([{"metric": k, "score": r.scores.get(k, ""), "baseline": r.baselines.get(k, "")}
                         for k in keys])
        for name, rows in r.tables.items():
            lines += ["", f"**{name}**", ""] + _table(rows)
        for caption, path in r.figures.items():
            lines += ["", f"![{caption}]({path})"]
        if r.samples:
            lines += ["", "<details><summary>samples</summary>", "", "```json"]
            lines += [json.dumps(s, default=str) for s in r.samples[:8]]
            lines += ["```", "</details>"]
    if figures:
        lines += ["", "## Training", ""]
        lines += [f"![{caption}]({path})" for caption, path in figures.items()]
    return "\n".join(lines) + "\n"


def write_report(results: list[TaskResult], out_dir: Path, meta: dict, figures: dict[str, str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    for r in results:  # numbers (not strings), for launch/quickstart's table and other readers
        key, _, _ = headline(r)
        base = r.baselines.get(key, next((v for k, v in r.baselines.items() if key and k.endswith(key.split("/")[-1])),
                                         None)) if key else None
        summary.append({"task": r.name, "status": r.status, "metric": key, "score": r.scores.get(key),
                        "baseline": base, **{k: r.baselines.get(k) for k in CONTROLS}, "reason": r.reason})
    doc = {"meta": meta, "summary": summary, "tasks": {r.name: r.to_json() for r in results}, "figures": figures}
    jpath, mpath = out_dir / "report.json", out_dir / "report.md"
    jpath.write_text(json.dumps(doc, indent=1, default=str))
    mpath.write_text(to_markdown(results, meta, figures))
    return jpath, mpath


def flat_metrics(results: list[TaskResult]) -> dict[str, float]:
    """`eval/<task>/<metric>` and `eval/<task>/baseline/<metric>` for wandb."""
    out = {}
    for r in results:
        if r.status != "ok":
            continue
        for k, v in r.scores.items():
            out[f"eval/{r.name}/{k}"] = float(v)
        for k, v in r.baselines.items():
            out[f"eval/{r.name}/baseline/{k}"] = float(v)
    return out
