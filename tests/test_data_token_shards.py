"""The vectorised token index and packing plan: the same rows and samples as the per-document code they replace,
a changed dataset rebuilds the index, and the loader never loads the text tokenizer."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.formats import iter_tar_samples
from data_pipeline.loader import build_loader
from data_pipeline.manifest import build_manifest, index_path, load_manifest, read_index, write_json_atomic
from data_pipeline.packing import padded_length, plan_rows
from data_pipeline.token_shards import TokenShards
from tests.conftest import ROOT
from tests.test_data_pipeline import data_env  # noqa: F401  (session fixture)


def loop_plan(lengths, splittable, seq_len, block_size=None):
    """The per-document next-fit loop plan_rows was before it was vectorised (the reference)."""
    lens = padded_length(np.asarray(lengths, dtype=np.int64), block_size, seq_len)
    raw = np.asarray(lengths, dtype=np.int64)
    rows, cur, fill, dropped, pad = [], [], 0, [], 0
    for d in range(len(lens)):
        L = int(lens[d])
        if L > seq_len:
            if not splittable[d]:
                dropped.append(d)
                continue
            pieces = [(s, min(s + seq_len, int(raw[d]))) for s in range(0, int(raw[d]), seq_len)]
        else:
            pieces = [(0, int(raw[d]))]
        for s, e in pieces:
            span = L if len(pieces) == 1 else int(padded_length(np.array([e - s]), block_size, seq_len)[0])
            if fill + span > seq_len:
                rows.append(cur)
                pad += seq_len - fill
                cur, fill = [], 0
            cur.append((d, s, e))
            fill += span
    if cur:
        rows.append(cur)
        pad += seq_len - fill
    return rows, dropped, pad


@pytest.mark.unit
@pytest.mark.parametrize("block", [None, 1, 8, 32])
def test_vectorised_plan_equals_the_per_document_loop(block):
    rng = np.random.default_rng(block or 0)
    for trial in range(30):
        n = int(rng.integers(0, 400))
        seq = int(rng.choice([32, 64, 96, 256]))
        lens = rng.integers(0 if trial % 3 == 0 else 1, int(seq * rng.choice([0.5, 1.2, 3.0])) + 2, size=n)
        split = rng.random(n) < rng.random()
        if n:
            lens[rng.integers(0, n, size=max(1, n // 20))] = seq * int(rng.integers(1, 4))  # exact multiples
        rows, dropped, pad = loop_plan(lens, split, seq, block)
        plan = plan_rows(lens, split, seq, block)
        assert list(map(list, plan.rows)) == rows, (trial, n, seq)
        assert plan.dropped == dropped and plan.padding == pad
        assert [plan.rows[k] for k in range(len(rows))][-3:] == rows[-3:] and list(plan.rows[2:5]) == rows[2:5]


def _json_columns(token_dir, split, tasks=None):
    """What the loader read from the JSON indices before the columns existed."""
    rows = []
    for s, sh in enumerate(load_manifest(token_dir)["splits"][split]["shards"]):
        idx = read_index(Path(token_dir) / split / sh["output"])
        col = {c: i for i, c in enumerate(idx["columns"])}
        for x in idx["samples"]:
            if tasks is None or x[col["task"]] in tasks:
                rows.append([s, x[col["len"]], x[col["n_image_tokens"]], x[col["task"]] == "interleaved",
                             *(x[col[c]] for c in ("ids_off", "ids_size", "mask_off", "mask_size", "mod_off",
                                                   "mod_size"))])
    return np.array(rows, dtype=np.int64)


@pytest.mark.e2e
def test_index_columns_and_reads_equal_the_json_indices_and_tars(data_env):  # noqa: F811
    d, _, _ = data_env
    for split, tasks in (("train", None), ("train", ("vqa", "t2i")), ("val", ("interleaved",))):
        ts, ref = TokenShards(d.token_dir, split, tasks), _json_columns(d.token_dir, split, tasks)
        assert np.array_equal(ts.shard, ref[:, 0]) and np.array_equal(ts.lengths, ref[:, 1])
        assert np.array_equal(ts.n_img, ref[:, 2]) and np.array_equal(ts.offsets, ref[:, 4:])
        assert np.array_equal(ts.splittable, (ref[:, 3] == 1) & (ref[:, 2] == 0))
    ts = TokenShards(d.token_dir, "train")
    tars = [t for t in ts.shards for _ in iter_tar_samples(t)]
    members = [m for t in ts.shards for _, m, _ in iter_tar_samples(t)]
    assert len(members) == len(ts) == len(tars)
    for i in range(len(ts)):
        got = ts.read(i)
        want = [np.load(io.BytesIO(members[i][k])) for k in ("ids.npy", "maskable.npy", "modality.npy")]
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want)), i
    assert len(list((Path(d.token_dir) / ".index").glob("train-*"))) == 1  # written by pretokenize


@pytest.mark.e2e
def test_a_changed_dataset_rebuilds_the_index(data_env, tmp_path):  # noqa: F811
    d, _, _ = data_env
    tok = tmp_path / "tokens"
    shutil.copytree(d.token_dir, tok, ignore=shutil.ignore_patterns(".index"))
    first = TokenShards(tok, "train")  # no columns yet: built at first use
    n0, dir0 = len(first), first.dir
    assert dir0.parent == tok / ".index"
    # The dataset changes: one shard loses its last 5 samples and the manifest is rebuilt, as pretokenize does.
    man = load_manifest(tok)
    tar = tok / "train" / man["splits"]["train"]["shards"][0]["output"]
    idx = read_index(tar)
    idx["samples"], idx["stats"]["token_samples"] = idx["samples"][:-5], idx["stats"]["token_samples"] - 5
    write_json_atomic(index_path(tar), idx)
    stale = TokenShards(tok, "train")
    assert stale.dir == dir0 and len(stale) == n0  # the manifest is the contract: until it changes, same columns
    build_manifest(tok, man["fingerprint"], man["vocab"], man["specials"])
    again = TokenShards(tok, "train")
    assert again.dir != dir0 and not dir0.exists() and len(again) == n0 - 5
    assert np.array_equal(again.lengths, _json_columns(tok, "train")[:, 1])
    # A shard edited behind the manifest's back is an error naming the fix, not silently wrong offsets.
    shutil.rmtree(tok / ".index")
    idx["samples"] = idx["samples"][:-1]
    write_json_atomic(index_path(tar), idx)
    with pytest.raises(ValueError, match="rerun `unidiff pretokenize`"):
        TokenShards(tok, "train")


LOADER_ONLY = r"""
import sys
opened = []
sys.addaudithook(lambda ev, args: opened.append(str(args[0])) if ev == "open" and args and
                 str(args[0]).endswith("tokenizer.json") else None)
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
d = DataConfig(token_dir=sys.argv[1], raw_dir="/nonexistent", text_tokenizer="/nonexistent/tokenizer.json")
L = build_loader(d, 192, 2, 0, 1, seed=0, block_size=16)
b = next(iter(L))
print(L.pad_id, int(b["input_ids"][b["doc_ids"] == -1][0]))
bad = [m for m in sys.modules if m == "tokenizers" or m.startswith("tokenizers.") or m.endswith("text_tokenizer")]
assert not bad and not opened, (bad, opened)
"""


@pytest.mark.e2e
def test_loader_does_not_load_the_text_tokenizer(data_env):  # noqa: F811
    from data_pipeline.layout import SpecialTokens
    from data_pipeline.text_tokenizer import load_text_tokenizer

    d, _, _ = data_env
    sp = SpecialTokens.from_tokenizer(load_text_tokenizer(Path(d.raw_dir) / "tokenizer.json"))
    assert load_manifest(d.token_dir)["specials"] == sp.to_dict() and SpecialTokens.from_dict(sp.to_dict()) == sp
    r = subprocess.run([sys.executable, "-c", LOADER_ONLY, d.token_dir], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(sp.pad)] * 2


@pytest.mark.e2e
def test_a_token_dir_without_recorded_specials_falls_back_to_its_own_tokenizer(data_env, tmp_path, capsys):  # noqa
    d, _, _ = data_env
    tok = tmp_path / "old"
    shutil.copytree(d.token_dir, tok)
    man = load_manifest(tok)
    pad = man.pop("specials")["pad"]
    write_json_atomic(tok / "manifest.json", man)
    old = replace(d, token_dir=str(tok))
    assert build_loader(old, 192, 2, 0, 1, seed=0).pad_id == pad
    assert "rerun `unidiff pretokenize CONFIG`" in capsys.readouterr().out
    man["fingerprint"]["text"] = "0" * 16  # the shards were made by another tokenizer
    write_json_atomic(tok / "manifest.json", man)
    with pytest.raises(ValueError, match="not the one that wrote the shards"):
        build_loader(old, 192, 2, 0, 1, seed=0)
    assert json.loads((tok / "manifest.json").read_text())["vocab"] == man["vocab"]
