"""train.precision=bf16 on every engine (bf16 module params, fp32 masters in the optimizer, fp32 gradient
accumulation) and train.overlap_grad_reduce (megatron DDP, DeepSpeed ZeRO-2 overlap_comm), in real gloo processes.

bf16 compute is emulated on these CPUs (no avx512_bf16), so the model is the tiny preset and runs are few steps."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.dist_helpers import run_distributed
from tests.engine_cases import make_cfg, reference, run_engine_steps

pytestmark = pytest.mark.dist
os.environ.setdefault("DS_ACCELERATOR", "cpu")

LR_SUB_ULP = 1e-5  # Adam's first update is ~lr per element: below half a bf16 ulp for every |w| >= 2**-8


def _with_lr(cfg, lr):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr, weight_decay=0.0))


def _bf16_phases(rank, world, engine, zero, run_dir):
    return [_bf16_phase(rank, world, engine, zero, run_dir, p) for p in ("sub_ulp", "straight", "resumed")]


def _bf16_phase(rank, world, engine, zero, run_dir, phase):
    """A fresh engine per phase: sub_ulp: one step at a sub-ulp lr, saved; straight: 2 steps, save, a 3rd step,
    save; resumed: load the 2-step save, the 3rd step again, save. -> the fp32 state each checkpoint holds (+ what
    the module holds)."""
    from training.checkpoint import CheckpointManager
    from training.engines import build_engine
    from training.engines.shard_format import full_state_dict_from_checkpoint
    cfg = make_cfg(engine, zero=zero, precision="bf16")
    if phase == "sub_ulp":
        cfg = _with_lr(cfg, LR_SUB_ULP)
    eng = build_engine(cfg)
    m = eng.unwrap()
    out = {"param_dtypes": {str(p.dtype) for p in m.parameters()},
           "buffer_dtypes": {n: str(b.dtype) for n, b in m.named_buffers()}}
    if phase == "resumed":
        eng.load(CheckpointManager(run_dir / "straight").latest_valid())
    elif phase == "straight":
        out["run"] = run_engine_steps(eng, cfg, steps=2)
        CheckpointManager(run_dir / "straight", keep_last=1).save(eng, 2, {})
    start = {"sub_ulp": 0, "straight": 2, "resumed": 2}[phase]
    out["last"] = run_engine_steps(eng, cfg, steps=1, start=start)
    out["ckpt"] = full_state_dict_from_checkpoint(CheckpointManager(run_dir / f"{phase}_end").save(eng, 3, {}))
    out["module"] = {n: p.detach().clone() for n, p in m.named_parameters()}
    return out


@pytest.mark.parametrize("engine,zero", [("native", 0), ("megatron", 0), ("deepspeed", 2)])
def test_bf16_params_fp32_master(tmp_path, engine, zero):
    from training.model import build_model
    sub, res, again = run_distributed(_bf16_phases, 1, engine, zero, tmp_path, timeout=300)[0]
    assert res["param_dtypes"] == {"torch.bfloat16"}, "module params must be bf16 in memory"
    assert set(res["buffer_dtypes"].values()) == {"torch.float32"}, res["buffer_dtypes"]  # expert_bias as released

    # The fp32 master keeps an update far below bf16 resolution; a bf16 master (or one refreshed from the bf16
    # module) would round it away: those elements would not move at all.
    cfg = make_cfg(engine, precision="fp32")
    init = build_model(cfg.model, "cpu", seed=cfg.train.seed).state_dict()
    name = "model.layers.1.mlp.experts.gate_proj"
    w0, w1 = init[name].bfloat16().float(), sub["ckpt"][name]  # masters start from the bf16 weights
    assert w1.dtype == torch.float32
    big = w0.abs() >= 2 ** -8  # half a bf16 ulp there is >= 1.5 x the update
    exact = (((w1 - w0).abs() - LR_SUB_ULP).abs() < 0.05 * LR_SUB_ULP)[big].float().mean()
    assert exact > 0.9, f"only {exact:.0%} of the sub-ulp Adam updates (lr each) reached the checkpoint's master"
    assert torch.equal(sub["module"][name], w1.bfloat16()), "module = master rounded to bf16"

    # bf16 training agrees with the fp32 single-process reference to bf16 tolerance.
    ref = reference(cfg, steps=3)
    losses = res["run"]["loss"] + res["last"]["loss"]
    assert losses == pytest.approx(ref["loss"], rel=2e-2)
    assert res["run"]["grad_norm"] == pytest.approx(ref["grad_norm"][:2], rel=5e-2)
    for k, v in ref["state"].items():
        if v.is_floating_point() and k in init:
            moved = (v - init[k]).abs().mean()
            rounding = (init[k].bfloat16().float() - init[k]).abs().mean()  # the bf16 start
            err = (res["ckpt"][k] - v).abs().mean()
            assert err <= 1.5 * rounding + 0.15 * moved, (f"{k}: bf16 run off the fp32 reference by {err:.2e} "
                                                          f"(update {moved:.2e}, bf16 start {rounding:.2e})")

    # save/resume in bf16 is exact: the resumed step equals the straight one bit for bit, masters included.
    assert again["last"] == res["last"]
    for k, v in res["ckpt"].items():
        assert torch.equal(v, again["ckpt"][k]), k
    for k, v in res["module"].items():
        assert torch.equal(v, again["module"][k]), k


def _overlap_runs(rank, world, engine, zero):
    """One step with the reduction overlapped, then a fresh engine without: -> [on, off]."""
    from training.engines import build_engine
    out = []
    for overlap in ("true", "false"):
        cfg = make_cfg(engine, zero=zero, extra=[f"train.overlap_grad_reduce={overlap}", "train.micro_batch_size=1"])
        eng = build_engine(cfg)
        active = (eng.model.ddp_config.overlap_grad_reduce if engine == "megatron"
                  else eng.model.zero_overlap_comm())
        out.append({**run_engine_steps(eng, cfg, steps=1), "state": eng.full_state_dict(), "active": active})
    return out


@pytest.mark.parametrize("engine,zero", [("megatron", 0), ("deepspeed", 2)])
def test_overlapped_grad_reduce_gives_the_same_steps(engine, zero):
    """2 ranks x 2 accumulated micro-batches: the reduction overlapped with the last micro-batch's backward
    (started from megatron's / DeepSpeed's grad hooks) gives the steps of the reduction after the backward."""
    on, off = run_distributed(_overlap_runs, 2, engine, zero)[0]
    assert on["active"] is True and off["active"] is False  # the switch reached megatron DDP / DeepSpeed ZeRO
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-6)
    assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5)
    for k, v in off["state"].items():
        torch.testing.assert_close(on["state"][k], v, atol=1e-6, rtol=0)
