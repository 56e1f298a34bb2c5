"""Engine pieces: layout validation, the reshardable shard format, non-finite steps, the EP dispatcher when a rank
receives no tokens, the vocab-parallel LM head and cross-entropy."""
from __future__ import annotations

import os

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.engine_cases import batch, loss_fn, make_cfg

os.environ.setdefault("DS_ACCELERATOR", "cpu")


# ---- impossible layouts fail before any work, naming the key ---------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("overrides,world,key", [
    ({"tp": 4}, 2, "parallel.tensor"),  # TP larger than the world
    ({"tp": 2, "ep": 4}, 2, "parallel.expert"),  # EP larger than the world
    ({"ep": 2}, 8, "train.global_batch_size"),  # 8 DP ranks x micro batch 2 > global batch 4
    ({"ep": 2, "etp": 2}, 2, "parallel.expert_tensor"),  # EP x ETP = 4 expert boxes on 2 ranks
])
def test_check_layout_rejects_impossible_worlds(overrides, world, key):
    from training.config import ConfigError
    from training.engines.world import check_layout
    with pytest.raises(ConfigError, match=key):
        check_layout(make_cfg(**overrides), world)


@pytest.mark.unit
def test_config_and_engines_reject_unsupported_layouts():
    from training.config import ConfigError
    with pytest.raises(ConfigError, match="model.num_experts"):
        make_cfg(ep=3)  # 8 experts do not split over 3 ranks
    with pytest.raises(ConfigError, match="model.num_attention_heads"):
        make_cfg(tp=3)
    with pytest.raises(ConfigError, match="model.moe_intermediate_size"):
        make_cfg(etp=3)  # 32 intermediate rows do not split over 3 ranks
    from training.engines.megatron import MegatronEngine
    with pytest.raises(ConfigError, match="parallel.pipeline=2"):
        MegatronEngine(make_cfg("megatron", extra=("parallel.pipeline=2", "model.num_hidden_layers=4")))
    from training.engines.deepspeed import DeepSpeedEngine
    with pytest.raises(ConfigError, match="parallel.expert_tensor=2"):
        DeepSpeedEngine(make_cfg("deepspeed", extra=("parallel.expert_tensor=2",)))
    with pytest.raises(ConfigError, match="parallel.zero_stage=3"):
        DeepSpeedEngine(make_cfg("deepspeed", ep=2, zero=3))


# ---- a distributed optimizer's flat ranges as boxes of the global tensor -----------------------------------------

@pytest.mark.unit
def test_flat_ranges_map_to_global_boxes():
    """Split a local tensor's flat order into random DP ranges; the boxes of every range, placed in the global
    tensor, rebuild exactly what the whole local tensor's pieces give (fused q|k|v pieces, an ETP sub-range)."""
    import random
    from training.engines.sharding import ShardSpec, flat_range_boxes, range_entries
    rng = random.Random(0)
    specs = [ShardSpec((12, 6), 0, [(0, 1, 2), (2, 5, 1), (3, 9, 2)], kind="tp"),  # 3 pieces on dim 0
             ShardSpec((4, 10, 3), 0, [(0, 2, 2)], kind="expert", sub=(1, 4, 5)),  # EP rows x ETP intermediate
             ShardSpec((7, 5), 1, [(0, 3, 2)], kind="tp"),  # row-parallel: a column block
             ShardSpec.replicated(())]
    for spec in specs:
        local = torch.randn(spec.local_shape)
        want = torch.zeros(spec.global_shape)
        for loc, off, size in spec.boxes():
            want[tuple(slice(o, o + z) for o, z in zip(off, size))] = local[loc]
        for _ in range(20):
            n = local.numel()
            cuts = sorted({0, n, *(rng.randrange(n + 1) for _ in range(rng.randint(0, 4)))})
            got = torch.full(spec.global_shape, float("nan"))
            for a, b in zip(cuts, cuts[1:]):
                assert len(flat_range_boxes(spec.local_shape, a, b)) <= max(1, 2 * len(spec.local_shape) - 1)
                for off, size, vals in range_entries(spec, a, local.reshape(-1)[a:b]):
                    assert tuple(vals.shape) == tuple(size)
                    got[tuple(slice(o, o + z) for o, z in zip(off, size))] = vals
            covered = ~torch.isnan(got)
            assert torch.equal(covered, _mask(spec)) and covered.sum() == local.numel()
            assert torch.equal(got[covered], want[covered])


def _mask(spec):
    m = torch.zeros(spec.global_shape, dtype=torch.bool)
    for _, off, size in spec.boxes():
        m[tuple(slice(o, o + z) for o, z in zip(off, size))] = True
    return m


# ---- shard format: write under one layout, read under another -------------------------------------------------

@pytest.mark.unit
def test_shard_format_reads_any_box_from_pieces_of_another_layout(tmp_path):
    from training.engines.shard_format import ShardReader, write_meta, write_rank_shards
    from training.engines.sharding import ShardSpec
    full = torch.randn(12, 10)
    # "saved" as 3 row blocks by 3 ranks, plus a scalar-ish replicated tensor on rank 0
    for r in range(3):
        write_rank_shards(tmp_path, r, [("w", (12, 10), (4 * r, 0), (4, 10), full[4 * r:4 * r + 4])]
                          + ([("b", (3,), (0,), (3,), torch.arange(3.0))] if r == 0 else []))
    write_meta(tmp_path, {"layout": {}})
    rd = ShardReader(tmp_path)
    torch.testing.assert_close(rd.read_full("w"), full)
    col = ShardSpec((12, 10), dim=1, pieces=[(0, 5, 5)], kind="tp")  # a column shard: crosses all row blocks
    torch.testing.assert_close(rd.read_local("w", col), full[:, 5:])
    qkv = ShardSpec((12, 10), dim=0, pieces=[(0, 2, 2), (2, 6, 1), (3, 9, 3)], kind="tp")  # fused 3-piece rows
    torch.testing.assert_close(rd.read_local("w", qkv), torch.cat([full[2:4], full[6:7], full[9:12]]))
    assert rd.read_full("b").tolist() == [0.0, 1.0, 2.0]
    (tmp_path / "shards" / "rank00001.json").unlink()  # a lost shard is an error, never silent zeros
    with pytest.raises(ValueError, match="covered"):
        ShardReader(tmp_path).read_full("w")


# ---- non-finite gradients: no update, grads cleared, every rank agrees ----------------------------------------

@pytest.mark.unit
def test_native_nonfinite_step_is_skipped():
    from training.engines.native import NativeEngine
    eng = NativeEngine(make_cfg("native"))
    before = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    ids, tgt = batch(eng.cfg, 0)
    eng.backward(loss_fn(eng.model, ids, tgt) * float("nan"))
    out = eng.step(1e-3)
    assert out["skipped"] and out["grad_norm"] != out["grad_norm"]
    assert all(torch.equal(p, before[n]) for n, p in eng.model.named_parameters())
    assert all(p.grad is None for p in eng.model.parameters())
    eng.backward(loss_fn(eng.model, ids, tgt))
    assert not eng.step(1e-3)["skipped"]  # the next good step trains normally


def _nonfinite(rank, world, engine):
    from training.engines import build_engine
    cfg = make_cfg(engine, ep=2)
    eng = build_engine(cfg)
    before = {n: p.detach().clone() for n, p in eng.unwrap().named_parameters()}
    ids, tgt = batch(cfg, 0)
    sl = slice(2 * rank, 2 * rank + 2)
    loss = loss_fn(eng.model, ids[sl], tgt[sl])
    eng.backward(loss * (float("inf") if rank == 1 else 1.0))  # only one rank sees the overflow
    out = eng.step(1e-3)
    unchanged = all(torch.equal(p, before[n]) for n, p in eng.unwrap().named_parameters())
    eng.backward(loss_fn(eng.model, ids[sl], tgt[sl]))
    out2 = eng.step(1e-3)
    return out["skipped"], unchanged, out2["skipped"]


@pytest.mark.dist
@pytest.mark.parametrize("engine", ["native", "megatron", "deepspeed"])
def test_nonfinite_step_skipped_on_all_ranks(engine):
    res = run_distributed(_nonfinite, 2, engine)
    assert res == [(True, True, False)] * 2


# ---- expert parallel dispatcher with a rank that receives no tokens -----------------------------------------

def _starved(rank, world):
    import torch.distributed as dist
    from tests.dist_helpers import init_gloo
    from training.engines.expert_parallel import AllToAllDispatcher
    from training.model.moe import Experts, LocalDispatcher
    init_gloo()
    torch.manual_seed(0)
    full = Experts(4, 8, 6, "off")
    for p in full.parameters():
        torch.nn.init.normal_(p, std=0.2)
    mine = Experts(2, 8, 6, "off")
    with torch.no_grad():
        for a, b in zip(mine.parameters(), full.parameters()):
            a.copy_(b[2 * rank:2 * rank + 2])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    idx = torch.randint(0, 2, (5, 2), generator=torch.Generator().manual_seed(10 + rank))  # experts 0,1 only
    xd, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = AllToAllDispatcher(dist.group.WORLD, 2)(mine, xd, idx, 4)
    ref = LocalDispatcher()(full, xl, idx, 4)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    return (float((out - ref).abs().max()), float((xd.grad - xl.grad).abs().max()),
            [float(p.grad.abs().max()) for p in mine.parameters()])


@pytest.mark.dist
def test_ep_dispatch_when_one_rank_gets_no_tokens():
    res = run_distributed(_starved, 2)
    for out_err, dx_err, _ in res:
        assert out_err < 1e-5 and dx_err < 1e-5
    assert all(g > 0 for g in res[0][2])  # rank 0 holds the used experts
    assert res[1][2] == [0.0, 0.0, 0.0]  # rank 1 got no tokens: zero (not missing) grads


# ---- vocab-parallel LM head: the loss's cross-entropy, argmax and entropy from [N, V/tp] logits -------------

def _vocab_parallel(rank, world):
    import torch.distributed as dist
    from tests.dist_helpers import init_gloo
    from training.diffusion.objective import _head_ce, masked_head_ce
    from training.engines.tensor_parallel import TorchTPComm
    from training.engines.vocab_parallel import VocabParallelHead
    init_gloo()
    g = torch.Generator().manual_seed(0)
    vocab, hidden_size, n = 24, 8, 11
    w = torch.randn(vocab, hidden_size, generator=g) * 2.0  # sharp enough that entropies and argmaxes differ
    w[15] = w[3] = w[3] * 4.0  # ids 3 and 15 (one on each rank) tie for the maximum on some rows
    h = torch.randn(n, hidden_size, generator=g)
    full = h @ w.T
    target = torch.randint(0, vocab, (n,), generator=g)
    target[:4] = full[:4].argmax(-1)  # right predictions, so the entropy's CAP weight is not all zero
    tie = int((full[:, 3] == full.max(-1).values).nonzero()[-1])
    target[tie] = 15  # as large as id 3, the first maximum: not right (torch.argmax returns the first)
    coef = torch.rand(n, generator=g)

    def loss_of(ce, correct, ent):
        return (coef * ce).sum() + 2.0 * (ent * correct).sum()

    wr, hr = w.clone().requires_grad_(), h.clone().requires_grad_()
    ref = _head_ce(wr, hr, target, True)
    loss_of(*ref).backward()
    per = vocab // world
    rows = slice(rank * per, (rank + 1) * per)
    head = VocabParallelHead(w[rows].clone(), TorchTPComm(dist.group.WORLD), rank * per)
    hv = h.clone().requires_grad_()
    got = masked_head_ce(head, hv, target, chunk=4, with_entropy=True)  # 3 chunks, recomputed in the backward
    loss_of(*got).backward()
    out = {"ce": float((got[0] - ref[0]).abs().max()), "correct": torch.equal(got[1], ref[1]),
           "n_correct": int(ref[1].sum()), "tie_right": bool(got[1][tie]),
           "entropy": float((got[2] - ref[2]).abs().max()), "dh": float((hv.grad - hr.grad).abs().max()),
           "dw": float((head.weight.grad - wr.grad[rows]).abs().max()),
           "logits": float((head(h) - full).abs().max())}
    empty = masked_head_ce(head, hv[:0], target[:0], chunk=4, with_entropy=True)  # no masked row: still a graph
    (empty[0].sum() + (empty[2] * empty[1]).sum()).backward()
    out["empty"] = [tuple(t.shape) for t in empty]
    return out


@pytest.mark.dist
def test_vocab_parallel_head_equals_full_logits():
    """TP=2 with the head split by vocab rows: CE, argmax == target (ties resolved to the first id, as torch.argmax)
    and entropy equal the full-logit path, and so do the gradients of hidden rows and weight; the full logits come
    back through forward; no masked row is a valid (empty) graph. (Against megatron-core's own
    vocab_parallel_cross_entropy: test_engines_parity, in the megatron TP runs.)"""
    import torch._dynamo  # noqa: F401  (non-reentrant checkpoint imports it, ~4 s: once here, not in every rank)
    for r in run_distributed(_vocab_parallel, 2):
        assert r["correct"] and r["n_correct"] >= 4 and not r["tie_right"]
        for key in ("ce", "entropy", "dh", "dw", "logits"):
            assert r[key] < 1e-5, (key, r[key])
        assert r["empty"] == [(0,), (0,), (0,)]
