"""lmms-eval's own CLI runs the unidiff adapter on the local shapes VQA task and agrees with `unidiff eval`.

The test builds its own run: the bundled sample (make-sample, a few scenes), a seeded random image tokenizer and a
seeded random tiny backbone in HF format. `python -m lmms_eval --model unidiff` (found through the `lmms_eval.models`
entry point) and `unidiff eval --tasks vqa` then answer the same val items from the same config: accuracy and every
generated answer must be equal. Offline: the task reads a local parquet file, HF_*_OFFLINE=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make setup` (pip install --no-deps lmms-eval)")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
N = 8  # val items; report.json keeps 8 samples, so every generated answer is compared


def _env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(tmp / "hf_home"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A config over a tiny sample, a random image tokenizer and a random backbone (all seeded)."""
    import torch

    from data_pipeline.image_tokenizer.load import build_image_tokenizer, save_image_tokenizer
    from data_pipeline.sample import make_sample
    from training.config import load_config
    from training.hf_format import export_hf
    from training.model import build_model

    tmp = tmp_path_factory.mktemp("lmms")
    cfg_path = tmp / "run.yaml"
    cfg_path.write_text(f"""defaults:
  - {ROOT / 'configs/model/tiny.yaml'}
run:
  dir: {tmp / 'runs'}
  name: lmms
data:
  raw_dir: {tmp / 'raw'}
  image_tokenizer:
    path: {tmp / 'image_tokenizer'}
  sample:
    train_scenes: 40
    val_scenes: {N}
    train_docs: 2
    val_docs: 1
    shards_per_split: 2
eval:
  checkpoint: {tmp / 'hf'}
  num_samples: {N}
  batch_size: 1  # the adapter answers one request at a time; a batch of 8 changes one random-model answer (measured)
  image_blind: false
  progress: false
tracking:
  wandb: disabled
""")
    cfg = load_config(cfg_path)
    make_sample(cfg.data.raw_dir, cfg.data.sample, progress=False)
    save_image_tokenizer(build_image_tokenizer(cfg.data.image_tokenizer), cfg.data.image_tokenizer.path)
    export_hf(build_model(cfg.model, seed=1).state_dict(), cfg.model, tmp / "hf", dtype=torch.float32)
    return tmp, cfg_path, cfg


def _unidiff_vqa(tmp: Path, cfg_path: Path) -> dict:
    out = tmp / "unidiff_eval"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "eval", str(cfg_path), "--tasks", "vqa",
                        f"eval.out_dir={out}"], cwd=ROOT, env=_env(tmp), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "report.json").read_text())["tasks"]["vqa"]


def _lmms_eval(tmp: Path, cfg_path: Path, task_dir: Path) -> tuple[float, list[dict]]:
    out = tmp / "lmms_out"
    r = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "unidiff",
                        "--model_args", f"config={cfg_path}", "--tasks", "unidiff_shapes_vqa",
                        "--include_path", str(task_dir), "--batch_size", "1", "--log_samples",
                        "--output_path", str(out)], cwd=tmp, env=_env(tmp), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    results = sorted(out.rglob("*_results.json"))
    assert results, f"no results file under {out}: {r.stderr[-2000:]}"
    acc = json.loads(results[-1].read_text())["results"]["unidiff_shapes_vqa"]["accuracy,none"]
    samples = [json.loads(line) for f in sorted(out.rglob("*unidiff_shapes_vqa*.jsonl"))
               for line in f.read_text().splitlines()]
    return acc, sorted(samples, key=lambda s: s["doc_id"])


def test_lmms_eval_cli_accuracy_equals_unidiff_eval(run):
    from evals.adapters.lmms_shapes_task import export_task

    tmp, cfg_path, cfg = run
    task_dir = tmp / "lmms_task"
    export_task(cfg, task_dir)
    ours = _unidiff_vqa(tmp, cfg_path)
    acc, samples = _lmms_eval(tmp, cfg_path, task_dir)
    assert ours["scores"]["items"] == len(samples) == N
    assert acc == ours["scores"]["accuracy"]
    # Item for item: same question, same reference, same generated answer (a random model's answers are arbitrary
    # strings, so this is what pins the two paths together, beyond an accuracy both could share by chance).
    mine = [(s["question"], s["expected"], s["generated"]) for s in ours["samples"]]
    theirs = [(s["input"], s["target"], s["filtered_resps"]) for s in samples]
    assert theirs == mine
