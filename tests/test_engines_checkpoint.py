"""Checkpoints across layouts and engines (real gloo processes): save under megatron TP=2 x EP=2, resume under a
single native process, deepspeed ZeRO-2 EP=2 and megatron TP=2; the continued step must equal an uninterrupted
single-process run. Also: exact resume in the same layout, and per-rank extra state."""
from __future__ import annotations

import os

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.engine_cases import make_cfg, reference, run_engine_steps

pytestmark = pytest.mark.dist
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _train_and_save(rank, world, engine, tp, ep, run_dir, steps, etp=1, extra=()):
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    cfg = make_cfg(engine, tp=tp, ep=ep, etp=etp, extra=extra)
    eng = build_engine(cfg)
    out = run_engine_steps(eng, cfg, steps=steps)
    path = CheckpointManager(run_dir, keep_last=2).save(eng, steps, {"rank": rank, "note": f"{engine}-r{rank}"})
    return {"path": str(path), **out}


def _load_and_continue(rank, world, engine, tp, ep, zero, run_dir, start, steps=1, etp=1, extra=()):
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    cfg = make_cfg(engine, tp=tp, ep=ep, zero=zero, etp=etp, extra=extra)
    eng = build_engine(cfg)
    ckpt = CheckpointManager(run_dir).latest_valid()
    extra = eng.load(ckpt)
    out = run_engine_steps(eng, cfg, steps=steps, start=start)
    out["extra"] = extra
    out["state"] = eng.full_state_dict()
    return out


def _check_continues(res, ref, label):
    """Every rank's resumed step equals the uninterrupted single-process run's next step (loss, grad norm,
    weights)."""
    for r in res:
        assert r["loss"] == pytest.approx(ref["loss"][1:], rel=1e-5), label
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"][1:], rel=1e-4), label
    worst = max(float((res[0]["state"][k] - ref["state"][k]).abs().max()) for k in ref["state"])
    assert worst < 1e-4, f"{label}: weights after resume differ by {worst}"


def _check_file_weights(path, ref1):
    """The checkpoint alone (no engine, no process group) gives the full weights after one step."""
    from training.engines.shard_format import full_state_dict_from_checkpoint
    full = full_state_dict_from_checkpoint(path)
    assert set(full) == set(ref1["state"])
    for k, v in ref1["state"].items():
        torch.testing.assert_close(full[k], v, atol=2e-5, rtol=0)


def test_reshard_megatron_tp2_ep2_to_other_layouts_and_engines(tmp_path):
    ref = reference(make_cfg(), steps=2)
    ref1 = reference(make_cfg(), steps=1)
    saved = run_distributed(_train_and_save, 4, "megatron", 2, 2, tmp_path, 1, timeout=240)
    assert saved[0]["loss"][0] == pytest.approx(ref["loss"][0], rel=1e-5)
    _check_file_weights(saved[0]["path"], ref1)
    for engine, world, tp, ep, zero in [("native", 1, 1, 1, 0), ("deepspeed", 2, 1, 2, 2), ("megatron", 2, 2, 1, 0)]:
        res = run_distributed(_load_and_continue, world, engine, tp, ep, zero, tmp_path, 1, timeout=240)
        _check_continues(res, ref, engine)
        for rank, r in enumerate(res):  # each rank gets its own extra state back (the saving run had 4 ranks)
            assert r["extra"] == {"rank": rank, "note": f"megatron-r{rank}"}


def test_reshard_expert_tensor_boxes(tmp_path):
    """Experts saved as 2-D boxes (megatron TP=2 x EP=2 x ETP=2: expert rows over EP, intermediate dim over ETP)
    read back as whole tensors, and into native ETP=2 with other boxes (EP=1), continuing like one process."""
    ref = reference(make_cfg(), steps=2)
    ref1 = reference(make_cfg(), steps=1)
    saved = run_distributed(_train_and_save, 4, "megatron", 2, 2, tmp_path, 1, 2, timeout=240)
    assert saved[0]["loss"][0] == pytest.approx(ref["loss"][0], rel=1e-5)
    _check_file_weights(saved[0]["path"], ref1)
    for world, etp in [(1, 1), (2, 2)]:
        res = run_distributed(_load_and_continue, world, "native", 1, 1, 0, tmp_path, 1, 1, etp, timeout=240)
        _check_continues(res, ref, f"native etp={etp}")


def test_resume_same_layout_is_exact(tmp_path):
    """Train 3 steps straight vs. 1 step + save + fresh processes + load + 2 steps (native EP=2): identical."""
    def straight(rank, world):
        from training.engines import build_engine
        cfg = make_cfg("native", ep=2)
        eng = build_engine(cfg)
        out = run_engine_steps(eng, cfg, steps=3)
        out["state"] = eng.full_state_dict()
        return out

    a = run_distributed(straight, 2)[0]
    run_distributed(_train_and_save, 2, "native", 1, 2, tmp_path, 1)
    b = run_distributed(_load_and_continue, 2, "native", 1, 2, 0, tmp_path, 1, 2)[0]
    assert b["loss"] == a["loss"][1:]
    assert b["grad_norm"] == a["grad_norm"][1:]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def _load_hf(rank, world, path):
    from training.engines import build_engine
    # other init: all from the file; experts as 2-D boxes (4 experts x 16 of 32 intermediate rows on each rank)
    eng = build_engine(make_cfg("native", tp=2, ep=2, etp=2, extra=("train.seed=3",)))
    eng.load_hf(path)
    return eng.full_state_dict()


def test_hf_import_into_sharded_layout(tmp_path):
    """An HF-format export of single-process weights, streamed into native TP=2 x EP=2 x ETP=2 shards, round-trips."""
    from training.hf_format import export_hf
    from training.model import build_model
    cfg = make_cfg()
    ref = build_model(cfg.model, "cpu", seed=11).state_dict()
    export_hf(ref, cfg.model, tmp_path / "hf", dtype=torch.float32)
    state = run_distributed(_load_hf, 4, tmp_path / "hf")[0]
    for k, v in ref.items():
        assert torch.equal(state[k], v), k


def test_reshard_deepspeed_tp2_to_native_and_deepspeed_tp2_ep2(tmp_path):
    ref = reference(make_cfg(), steps=2)
    saved = run_distributed(_train_and_save, 2, "deepspeed", 2, 1, tmp_path, 1, timeout=240)
    assert saved[0]["loss"][0] == pytest.approx(ref["loss"][0], rel=1e-5)
    for engine, world, tp, ep, zero in [("native", 1, 1, 1, 0), ("deepspeed", 4, 2, 2, 2)]:
        res = run_distributed(_load_and_continue, world, engine, tp, ep, zero, tmp_path, 1, timeout=240)
        _check_continues(res, ref, engine)


def test_lora_checkpoint_reshards_across_engines(tmp_path):
    """model.lora saved under megatron EP=2 (frozen base written, AdamW moments for the adapters only) resumes under
    deepspeed ZeRO-2 EP=2 and a single native process like the uninterrupted single-process LoRA run."""
    from training.engines.shard_format import ShardReader
    from training.model.lora import is_adapter
    lora = ("model.lora.rank=4", "model.lora.alpha=8")
    ref = reference(make_cfg(extra=lora), steps=2)
    saved = run_distributed(_train_and_save, 2, "megatron", 1, 2, tmp_path, 1, 1, lora, timeout=240)
    names = ShardReader(saved[0]["path"]).names()
    moments = {n.split("/", 1)[1] for n in names if n.startswith("optim.exp_avg/")}
    assert moments and moments == {n for n in names if is_adapter(n)}
    for engine, world, ep, zero in [("deepspeed", 2, 2, 2), ("native", 1, 1, 0)]:
        res = run_distributed(_load_and_continue, world, engine, 1, ep, zero, tmp_path, 1, 1, 1, lora, timeout=240)
        _check_continues(res, ref, f"lora {engine}")


def _save_before_first_step(rank, world, run_dir):
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    cfg = make_cfg("deepspeed", ep=2, zero=2)
    eng = build_engine(cfg)
    CheckpointManager(run_dir).save(eng, 0, {"rank": rank})  # e.g. SIGTERM before the first optimizer step
    eng2 = build_engine(cfg)
    eng2.load(CheckpointManager(run_dir).latest_valid())
    return run_engine_steps(eng2, cfg, steps=2)


def test_deepspeed_save_before_first_step_resumes_as_fresh(tmp_path):
    """A ZeRO-2 checkpoint written before any optimizer step has weights and no AdamW state; resuming from it
    trains exactly like a fresh run."""
    out = run_distributed(_save_before_first_step, 2, tmp_path, timeout=240)
    ref = reference(make_cfg("native"), steps=2)
    for r in out:
        for a, b in zip(r["loss"] + r["grad_norm"], ref["loss"] + ref["grad_norm"]):
            assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (r, ref["loss"], ref["grad_norm"])
