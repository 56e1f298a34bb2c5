"""Packing and the loader: DP disjoint/complete coverage, TP peers identical, exact mid-epoch resume, mixing."""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from data_pipeline.loader import SyntheticLoader, build_loader, epoch_order
from data_pipeline.packing import materialise_row, plan_rows
from tests.test_data_pipeline import data_env  # noqa: F401  (session fixture)

SEQ, B = 192, 2


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def row_invariants(b, sp_start, sp_end, block):
    ids, doc, pos, msk = b["input_ids"], b["doc_ids"], b["position_ids"], b["maskable"]
    for r in range(ids.shape[0]):
        for d in doc[r].unique().tolist():
            where = (doc[r] == d).nonzero().flatten()
            if d == -1:
                assert not msk[r, where].any() and (pos[r, where] == 0).all()
                continue
            assert (where == torch.arange(where[0], where[-1] + 1)).all()  # contiguous
            assert (pos[r, where] == torch.arange(len(where))).all()  # restarts at 0
            assert where[0] % block == 0 and len(where) % block == 0  # block aligned
            seg = ids[r, where]
            # an image block is never split: every <|image|> has its <|/image|> in the same document piece
            assert (seg == sp_start).sum() == (seg == sp_end).sum()


@pytest.mark.e2e
def test_dp_ranks_disjoint_complete_and_tp_peers_identical(data_env):  # noqa: F811
    d, _, _ = data_env
    dp = 2
    loaders = [build_loader(d, SEQ, B, r, dp, seed=3, block_size=16) for r in range(dp)]
    n = len(loaders[0])
    per_rank = [take(L, n) for L in loaders]
    keys = [set() for _ in range(dp)]
    for r in range(dp):
        for b in per_rank[r]:
            keys[r].update(b["sample_ids"][b["sample_ids"] >= 0].unique().tolist())
    assert not keys[0] & keys[1]
    plan = loaders[0].plan(0)
    expected = {(int(plan.src[dd]) << 40) | int(plan.idx[dd])
                for row in plan.rows[:n * B * dp] for dd, _, _ in row}
    assert keys[0] | keys[1] == expected
    assert loaders[0].stats["rows_dropped_tail"] == len(plan.rows) - n * B * dp
    # a TP/EP peer of rank 1 (same dp_rank, different global rank) sees identical batches
    peer = take(build_loader(d, SEQ, B, 1, dp, seed=3, block_size=16), 5)
    for a, b in zip(per_rank[1][:5], peer):
        assert all(torch.equal(a[k], b[k]) for k in a)
    from data_pipeline.layout import SpecialTokens
    from data_pipeline.text_tokenizer import load_text_tokenizer
    sp = SpecialTokens.from_tokenizer(load_text_tokenizer(d.raw_dir + "/tokenizer.json"))
    for b in per_rank[0][:20]:
        row_invariants(b, sp.image_start, sp.image_end, 16)


@pytest.mark.e2e
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(data_env, workers):  # noqa: F811
    d, _, _ = data_env
    d = replace(d, num_workers=workers)
    ref = take(build_loader(d, SEQ, B, 0, 1, seed=7), 12)
    first = build_loader(d, SEQ, B, 0, 1, seed=7)
    got = take(first, 5)
    state = first.state_dict()
    second = build_loader(d, SEQ, B, 0, 1, seed=7)
    second.load_state_dict(state)
    got += take(second, 7)
    assert [b["sample_ids"].tolist() for b in got] == [b["sample_ids"].tolist() for b in ref]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, ref))
    other = take(build_loader(d, SEQ, B, 0, 1, seed=8), 1)[0]
    assert not torch.equal(other["input_ids"], ref[0]["input_ids"])


@pytest.mark.e2e
def test_resume_across_epoch_boundary_and_epochs_differ(data_env):  # noqa: F811
    d, _, _ = data_env
    L = build_loader(d, SEQ, 8, 0, 1, seed=1)
    n = len(L)
    ref = take(build_loader(d, SEQ, 8, 0, 1, seed=1), n + 3)
    first = build_loader(d, SEQ, 8, 0, 1, seed=1)
    take(first, n - 1)
    second = build_loader(d, SEQ, 8, 0, 1, seed=1)
    second.load_state_dict(first.state_dict())
    got = take(second, 4)
    assert [b["sample_ids"].tolist() for b in got] == [b["sample_ids"].tolist() for b in ref[n - 1:]]
    assert second.epoch == 1 and not torch.equal(ref[0]["input_ids"], ref[n]["input_ids"])


@pytest.mark.e2e
def test_weighted_mixing_by_task(data_env):  # noqa: F811
    d, _, _ = data_env
    d = replace(d, datasets={"vqa": 3.0, "t2i": 1.0})
    L = build_loader(d, SEQ, B, 0, 1, seed=0)
    share = np.mean([(L.plan(e).src == 0).mean() for e in range(5)])  # ~2400 draws: 3 sigma = 0.027
    assert 0.72 < share < 0.78  # 3:1
    man_t2i = [s for s, _ in L.sources_w][1]
    assert len(man_t2i) > 0


@pytest.mark.unit
def test_epoch_order_permutation_and_mixing():
    s, i = epoch_order([10], [1.0], 0, 0)
    assert sorted(i.tolist()) == list(range(10)) and (s == 0).all()
    s2, i2 = epoch_order([10], [1.0], 0, 1)
    assert not np.array_equal(i, i2)
    s, i = epoch_order([3, 50], [10.0, 1.0], 0, 0)
    for k in range(2):
        sub = i[s == k]
        n = [3, 50][k]
        for c in range(0, len(sub), n):  # each wrap of a small source is a full permutation
            chunk = sub[c:c + n]
            if len(chunk) == n:
                assert sorted(chunk.tolist()) == list(range(n))


@pytest.mark.unit
def test_packing_plan_brute_force():
    rng = np.random.default_rng(0)
    lens = rng.integers(1, 90, size=300)
    split = rng.random(300) < 0.3
    lens[::37] = 200  # longer than the row
    plan = plan_rows(lens, split, 64, block_size=8)
    covered = {}
    for row in plan.rows:
        used = 0
        for dd, s, e in row:
            used += -(-(e - s) // 8) * 8
            covered.setdefault(dd, []).append((s, e))
        assert used <= 64
    for dd in range(300):
        if lens[dd] > 64 and not split[dd]:
            assert dd in plan.dropped and dd not in covered
        else:
            spans = sorted(covered[dd])
            assert spans[0][0] == 0 and spans[-1][1] == lens[dd]
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    r = materialise_row([(np.array([5, 6, 7]), np.array([0, 1, 1], bool), np.array([0, 0, 1], np.uint8))],
                        16, 99, block_size=4)
    assert r["input_ids"].tolist() == [5, 6, 7] + [99] * 13
    assert r["maskable"].tolist() == [False, True, True, True] + [False] * 12
    assert r["doc_ids"].tolist() == [0] * 4 + [-1] * 12
    assert r["is_image"].tolist() == [False, False, True] + [False] * 13


@pytest.mark.unit
def test_synthetic_loader_schema_and_resume():
    from data_pipeline.config import DataConfig
    d = DataConfig(synthetic=True)
    L = build_loader(d, 64, 3, 1, 2, seed=5, block_size=8)
    assert isinstance(L, SyntheticLoader)
    ref = take(build_loader(d, 64, 3, 1, 2, seed=5, block_size=8), 6)
    got = take(L, 2)
    L2 = build_loader(d, 64, 3, 1, 2, seed=5, block_size=8)
    L2.load_state_dict(L.state_dict())
    got += take(L2, 4)
    for a, b in zip(got, ref):
        assert set(a) >= {"input_ids", "doc_ids", "maskable", "is_image", "position_ids"}
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["input_ids"].shape == (3, 64) and a["maskable"].dtype == torch.bool
        assert (a["is_image"] == (a["input_ids"] >= 2048)).all()
    other_rank = take(build_loader(d, 64, 3, 0, 2, seed=5, block_size=8), 1)[0]
    assert not torch.equal(other_rank["input_ids"], ref[0]["input_ids"])


def _global_step_rows(loaders, steps):
    """The sample ids of each optimizer step of `loaders` (one per dp rank), as a set per step."""
    accum = loaders[0].G // (loaders[0].B * loaders[0].dp_size)
    its = [iter(L) for L in loaders]
    out = []
    for _ in range(steps):
        ids = set()
        for it in its:
            for b in itertools.islice(it, accum):
                ids.update(b["sample_ids"][b["sample_ids"] >= 0].unique().tolist())
        out.append(ids)
    return out


@pytest.mark.e2e
def test_elastic_resume_keeps_the_global_sample_order(data_env):  # noqa: F811
    """Real token shards, global batch 8: saved by 4 ranks (micro batch 2) after 3 steps, resumed by 2 ranks
    (micro batch 2, 2 micro batches per step) and by 8 ranks (micro batch 1): the following steps, across the
    epoch boundary, hold the same samples as the uninterrupted 4-rank run."""
    d, _, _ = data_env
    G = 8
    steps_per_epoch = len(build_loader(d, SEQ, 2, 0, 4, seed=3, global_batch_size=G))
    total = steps_per_epoch + 3  # crosses into the next epoch
    ref = _global_step_rows([build_loader(d, SEQ, 2, r, 4, seed=3, global_batch_size=G) for r in range(4)], total)
    first = [build_loader(d, SEQ, 2, r, 4, seed=3, global_batch_size=G) for r in range(4)]
    _global_step_rows(first, 3)
    saved = first[0].state_dict()
    assert saved["rows"] == 3 * G
    for dp, micro in ((2, 2), (8, 1)):
        again = [build_loader(d, SEQ, micro, r, dp, seed=3, global_batch_size=G) for r in range(dp)]
        for L in again:
            L.load_state_dict(saved)
        assert _global_step_rows(again, total - 3) == ref[3:], (dp, micro)
    other = build_loader(d, SEQ, 2, 0, 4, seed=3, global_batch_size=16)
    with pytest.raises(ValueError, match="global_batch_size=8"):
        other.load_state_dict(saved)


@pytest.mark.e2e
def test_training_takes_special_ids_from_the_manifest_not_the_tokenizer(data_env, tmp_path):  # noqa: F811
    """Token shards carry their special ids and vocab layout: training runs with no tokenizer file at all, and a
    model whose vocab layout differs from the shards' is refused naming both."""
    from tests.conftest import ROOT
    from training.config import ConfigError, load_config
    from training.trainer import train
    d, _, _ = data_env
    words = [f"data.raw_dir={d.raw_dir}", f"data.token_dir={d.token_dir}", "data.split=val",
             f"data.text_tokenizer={tmp_path / 'no-such-tokenizer.json'}", "train.steps=1", "train.seq_len=128",
             "train.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32", "train.save_every=0",
             "tracking.wandb=disabled", f"run.dir={tmp_path}"]
    last = train(load_config(ROOT / "configs/model/tiny.yaml", [*words, "run.name=ok"]))
    assert np.isfinite(last["loss"])
    with pytest.raises(ConfigError, match="image_token_offset=2048"):
        train(load_config(ROOT / "configs/model/tiny.yaml", [*words, "run.name=bad", "model.image_token_offset=2176",
                                                               "model.vocab_size=2432"]))
