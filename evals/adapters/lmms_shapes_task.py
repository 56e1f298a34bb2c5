"""A local lmms-eval task over the shapes val split: the VQA samples `unidiff data make-sample` wrote into
`<data.raw_dir>/val/*.tar`, exported as a parquet file (image, question, answer) beside the task YAML, so
`python -m lmms_eval --include_path DIR --tasks unidiff_shapes_vqa` reads local files only (no hub download).

The items are the first `eval.num_samples` val scenes, the same ones `unidiff eval --tasks vqa` regenerates from
`data.sample.seed` (evals/heldout.py); answers are capped at `eval.vqa_gen_length` tokens and scored with the shapes
answer key's exact match (`data_pipeline.shapes.score_answer`), so the two accuracies agree item for item.

    python -m evals.adapters.lmms_shapes_task CONFIG.yaml OUT_DIR [key=value ...]
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

TASK = "unidiff_shapes_vqa"
DATA_FILE = "shapes_vqa_val.parquet"
_KEY = re.compile(r"^shapes-vqa-(?P<split>[a-z]+)-(?P<i>\d+)$")

# `!function` names an importable module (lmms-eval falls back to an absolute import when no utils.py sits beside
# the YAML). data_files is relative to the YAML's dir (lmms-eval resolves it for the local builders).
_YAML = """\
# Written by evals/adapters/lmms_shapes_task.py: {n} VQA items of {raw}
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    {split}: {data}
test_split: {split}
output_type: generate_until
doc_to_visual: !function evals.adapters.lmms_shapes_task.doc_to_visual
doc_to_text: !function evals.adapters.lmms_shapes_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {gen_length}   # eval.vqa_gen_length
  until: []                      # the sampler stops at EOS, as in `unidiff eval`
process_results: !function evals.adapters.lmms_shapes_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def val_vqa_docs(raw_split_dir: str | Path, n: int) -> list[dict]:
    """The first n shapes VQA samples (by scene index) of the raw split's shards, with their PNG bytes."""
    from data_pipeline.formats import ImageLimits, iter_tar_samples, parse_sample

    found = {}
    shards = sorted(Path(raw_split_dir).glob("*.tar"))
    for shard in shards:
        for key, members, err in iter_tar_samples(shard):
            if err:
                raise ValueError(f"raw shard {shard} is damaged at {key}: {err}; rerun `unidiff data make-sample`")
            m = _KEY.match(key)
            if not m or int(m["i"]) >= n:
                continue
            s = parse_sample(key, members, ImageLimits())  # the reader pretokenize uses: same question text
            (question, answer), *_ = s.turns
            found[int(m["i"])] = {"index": int(m["i"]), "question": question, "answer": answer,
                                  "qtype": s.meta["qtype"], "image": {"bytes": members["png"], "path": None}}
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise ValueError(f"{raw_split_dir} ({len(shards)} shards) has no shapes VQA sample for scene(s) {missing[:5]}: "
                         f"lower eval.num_samples={n} or raise data.sample.val_scenes and rerun make-sample")
    return [found[i] for i in range(n)]


def export_task(cfg, out_dir: str | Path) -> Path:
    """Write `<out_dir>/unidiff_shapes_vqa.yaml` and its parquet data for the config's eval split; -> the YAML."""
    import datasets

    e = cfg.eval
    raw = Path(cfg.data.raw_dir) / e.split
    docs = val_vqa_docs(raw, e.num_samples)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"index": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "qtype": datasets.Value("string"),
                                  "image": datasets.Image()})
    datasets.Dataset.from_list(docs, features=features).to_parquet(str(out / DATA_FILE))
    path = out / f"{TASK}.yaml"
    path.write_text(_YAML.format(n=len(docs), raw=raw, task=TASK, split=e.split, data=DATA_FILE,
                                 gen_length=e.vqa_gen_length))
    return path


# ---------------------------------------------------------------------------------- lmms-eval task functions

def doc_to_visual(doc) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]


def process_results(doc, results) -> dict:
    from data_pipeline.shapes import score_answer

    return {"accuracy": float(score_answer(doc["answer"], results[0]))}


def main(argv: list[str]) -> None:
    from training.config import load_config

    if len(argv) < 2:
        sys.exit("usage: python -m evals.adapters.lmms_shapes_task CONFIG.yaml OUT_DIR [key=value ...]")
    print(export_task(load_config(argv[0], argv[2:]), argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
