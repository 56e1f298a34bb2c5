"""The harness end to end on reference models: report.json parses, report.md has the tables, figures exist,
wandb (offline) receives the numbers, and a bad --tasks value fails naming the allowed tasks."""
from __future__ import annotations

import json

import pytest
import torch

from tests import evals_fixtures as fx

pytestmark = pytest.mark.unit


def test_report_files_exist_and_parse(tmp_path_factory, tmp_path):
    from evals.harness import evaluate

    tmp = str(tmp_path_factory.mktemp("evtok"))
    ho = fx.heldout(tmp, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 5.0 / (s + 1), "loss_text": 4.0})
                                                     for s in range(5)))
    (run_dir / "expert_load_last.json").write_text(json.dumps([[3.0, 1.0, 2.0, 2.0, 0.0, 4.0, 1.0, 3.0]] * 2))
    ctx = fx.context(tmp, fx.oracle_model(tmp, ho), ho, decoders={"teacher": fx.oracle_decoder(ho)},
                     elbo_mc=2, choice_mc=4, speed_repeats=1, speed_gen_length=32)
    ctx.cfg.run.dir, ctx.cfg.run.name = str(tmp_path), "run"
    ctx.run_dir = run_dir
    ctx.cfg.tracking.wandb = "offline"
    names = ["elbo", "choice", "vqa", "caption", "t2i", "reconstruction", "speed"]
    results = evaluate(ctx.cfg, names, ctx)
    assert [r.status for r in results] == ["ok"] * len(names), [(r.name, r.reason) for r in results]
    out = run_dir / "eval"
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["tasks"]) == set(names)
    summary = {row["task"]: row for row in doc["summary"]}
    assert summary["choice"]["metric"] == "accuracy" and summary["choice"]["score"] == 1.0
    assert 0 < summary["choice"]["baseline"] < 1
    assert doc["tasks"]["vqa"]["scores"]["accuracy"] == 1.0 and "accuracy" in doc["tasks"]["vqa"]["baselines"]
    md = (out / "report.md").read_text()
    assert "| task | status | metric | score | baseline / chance | answer prior | image-blind | seconds |" in md
    for task in ("vqa", "choice", "caption"):  # every understanding task states its two controls beside chance
        assert summary[task]["answer_prior"] is not None and summary[task]["image_blind"] is not None, task
    for png in ("loss_curves.png", "expert_load_train.png", "t2i_teacher.png", "reconstruction.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in md
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/vqa/accuracy"] == 1.0 and "eval/choice/baseline/accuracy" in rows[0]
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run dir missing"


def test_bad_tasks_flag_names_allowed_values():
    from evals.harness import parse_tasks
    from training.config import ConfigError

    assert parse_tasks("elbo, vqa", ["speed"]) == ["elbo", "vqa"]
    assert parse_tasks(None, ["speed"]) == ["speed"]
    with pytest.raises(ConfigError, match="reconstruction"):
        parse_tasks("elbo,bleu", [])


def test_eval_config_validation():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="eval.elbo_mc=3"):
        fx.tiny_cfg(elbo_sampling="antithetic", elbo_mc=3)
    with pytest.raises(ConfigError, match="eval.tasks"):
        fx.tiny_cfg(tasks="[elbo,fid]")


def test_build_context_records_why_parts_are_missing(tmp_path):
    from evals.harness import build_context

    cfg = fx.tiny_cfg()
    cfg.run.dir, cfg.data.raw_dir = str(tmp_path), str(tmp_path / "raw")
    ctx = build_context(cfg)
    assert ctx.model is None and "model" in ctx.unavailable and "decoders" in ctx.unavailable
    assert "tokenizer.json" in ctx.unavailable["tokenizer"]
