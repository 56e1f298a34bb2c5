"""CheckpointManager: atomic saves, `latest` pointer, keep-last-N, fallback on corrupt/partial checkpoints, and a
process SIGKILLed in the middle of a save (a real child process, killed while its temporary dir exists)."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.engine_cases import ROOT, batch, loss_fn, make_cfg
from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.unit


def _engine(extra=()):
    from training.engines.native import NativeEngine
    return NativeEngine(make_cfg("native", extra=extra))


def _train_step(eng, step):
    ids, tgt = batch(eng.cfg, step)
    eng.backward(loss_fn(eng.model, ids, tgt))
    return eng.step(eng.cfg.train.lr)


def test_save_writes_manifest_latest_and_prunes(tmp_path):
    from training.checkpoint import CheckpointManager, verify
    eng = _engine()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    paths = []
    for step in (1, 2, 3):
        _train_step(eng, step)
        paths.append(mgr.save(eng, step, {"step": step}))
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == paths[-1].name
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [paths[1].name, paths[2].name]
    assert not list(root.glob(".tmp_*"))
    manifest = json.loads((paths[-1] / "manifest.json").read_text())
    assert manifest["step"] == 3 and "meta.json" in manifest["files"]
    assert verify(paths[-1]) is None
    assert mgr.latest_valid() == paths[-1]


def test_resume_restores_weights_optimizer_and_extra(tmp_path):
    from training.checkpoint import CheckpointManager
    a = _engine()
    for s in range(2):
        _train_step(a, s)
    rng = torch.get_rng_state()
    CheckpointManager(tmp_path, 2).save(a, 2, {"rng": rng, "loader": {"pos": 17}})
    b = _engine(extra=("train.seed=99",))  # different init: everything must come from the checkpoint
    extra = b.load(CheckpointManager(tmp_path, 2).latest_valid())
    assert torch.equal(extra["rng"], rng) and extra["loader"] == {"pos": 17}
    assert b._optim_step() == a._optim_step() == 2
    ra, rb = _train_step(a, 2), _train_step(b, 2)  # the next step is identical only if the AdamW moments are
    assert ra == rb
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_corrupt_or_partial_latest_falls_back_with_warning(tmp_path, caplog):
    from training.checkpoint import CheckpointManager
    eng = _engine()
    mgr = CheckpointManager(tmp_path, keep_last=3)
    first = mgr.save(eng, 1, {})
    second = mgr.save(eng, 2, {})
    shard = next((second / "shards").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different content: only the hash can tell
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert mgr.latest_valid() == first
    assert "sha256" in caplog.text
    (second / "manifest.json").unlink()  # a partial checkpoint
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert mgr.latest_valid() == first
    assert "manifest" in caplog.text
    _engine().load(first)  # and the fallback loads
    (tmp_path / "checkpoints" / "latest").write_text("step_999999\n")  # pointer to nothing
    assert mgr.latest_valid() == first


_KILL_CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from tests.engine_cases import make_cfg
from training.checkpoint import CheckpointManager
from training.engines.native import NativeEngine
# A wider model so one save takes long enough to be interrupted.
cfg = make_cfg("native", extra=["model.hidden_size=256", "model.moe_intermediate_size=256",
                                "model.intermediate_size=512", "model.vocab_size=8192"])
eng = NativeEngine(cfg)
mgr = CheckpointManager({run!r}, keep_last=3)
for step in range(1, 10000):
    mgr.save(eng, step, {{"step": step}})
    print("saved", step, flush=True)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    from training.checkpoint import CheckpointManager
    run = tmp_path / "run"
    root = run / "checkpoints"
    code = _KILL_CHILD.format(root=str(ROOT), run=str(run))
    for _attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.time() + 120
            while not (root / "latest").exists() and time.time() < deadline:
                time.sleep(0.01)
            assert (root / "latest").exists(), "child never completed a first checkpoint"
            while not list(root.glob(".tmp_step_*")) and time.time() < deadline:
                time.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        if list(root.glob(".tmp_step_*")):
            break  # killed while a save was in flight
    assert list(root.glob(".tmp_step_*")), "could not kill the child during a save"
    mgr = CheckpointManager(run, keep_last=3)
    ckpt = mgr.latest_valid()
    assert ckpt is not None and ckpt.name.startswith("step_")
    eng = _engine(extra=("model.hidden_size=256", "model.moe_intermediate_size=256",
                         "model.intermediate_size=512", "model.vocab_size=8192"))
    extra = eng.load(ckpt)
    assert extra["step"] == int(ckpt.name.split("_")[1])


def test_trainer_state_roundtrips_without_pickle(tmp_path):
    """RNG states (torch, numpy, python), an optimizer state dict (int keys, tuples) come back equal from
    JSON + safetensors, and a saved checkpoint holds no pickle (nothing read back can execute code)."""
    import random

    import numpy as np

    from training.checkpoint import CheckpointManager
    from training.state_file import read_state, write_state
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), betas=(0.9, 0.95))
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
             "optimizer": opt.state_dict(), "misc": [1, 2.5, None, "s", (1, (2, 3))], "nan": float("nan")}
    write_state(tmp_path / "s", state)
    back = read_state(tmp_path / "s")
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["rng"]["python"] == state["rng"]["python"] and back["misc"] == state["misc"]
    np.random.set_state(back["rng"]["numpy"])
    a = np.random.rand(4)
    np.random.set_state(state["rng"]["numpy"])
    assert (a == np.random.rand(4)).all()
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert all(torch.equal(back["optimizer"]["state"][i][k], v) for i, s in state["optimizer"]["state"].items()
               for k, v in s.items())
    opt.load_state_dict(back["optimizer"])
    with pytest.raises(TypeError, match="cannot be saved"):
        write_state(tmp_path / "bad", {"f": lambda: 0})

    eng = _engine()
    ckpt = CheckpointManager(tmp_path / "run").save(eng, 1, {"step": 1, "rng": {"0": state["rng"]}})
    for p in ckpt.rglob("*"):
        if p.is_file():
            assert p.suffix in (".json", ".safetensors"), p
    extra = _engine().load(ckpt)
    assert extra["step"] == 1 and extra["rng"]["0"]["python"] == state["rng"]["python"]


def test_verify_splits_hashing_over_ranks(tmp_path):
    """Each rank hashes 1/world of the files (rank i % world); sizes and existence are checked by all."""
    from training.checkpoint import CheckpointManager, verify
    ckpt = CheckpointManager(tmp_path).save(_engine(), 1, {"step": 1})
    files = sorted(json.loads((ckpt / "manifest.json").read_text())["files"])
    target = ckpt / files[1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the owner of file 1's hash can tell
    target.write_bytes(bytes(data))
    assert verify(ckpt, True, rank=0, world=2) is None
    assert "sha256" in verify(ckpt, True, rank=1, world=2)
    assert "sha256" in verify(ckpt, True)
    (ckpt / files[0]).unlink()
    assert "missing" in verify(ckpt, True, rank=1, world=2)  # existence: every rank


def _views_disagree(rank, world, roots):
    """Each rank resumes through its own copy of the run dir (its filesystem view)."""
    from tests.dist_helpers import init_gloo
    from training.checkpoint import CheckpointManager
    init_gloo()
    import logging as lg
    records = []
    handler = lg.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    lg.getLogger("training.checkpoint").addHandler(handler)
    found = CheckpointManager(roots[rank]).latest_valid()
    return found.name, records


@pytest.mark.dist
def test_ranks_with_different_views_agree_and_name_the_rank(tmp_path):
    """A shard missing in one rank's view of the newest checkpoint: both ranks fall back to the same older
    checkpoint, and the warning names the rank and the file (no rank resumes alone from a checkpoint others lack)."""
    import shutil

    from training.checkpoint import CheckpointManager
    mgr = CheckpointManager(tmp_path / "a", keep_last=3)
    eng = _engine()
    mgr.save(eng, 1, {"step": 1})
    second = mgr.save(eng, 2, {"step": 2})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    lost = next((tmp_path / "b" / "checkpoints" / second.name / "shards").glob("*.safetensors"))
    lost.unlink()
    out = run_distributed(_views_disagree, 2, [tmp_path / "a", tmp_path / "b"])
    assert [name for name, _ in out] == ["step_000001", "step_000001"], out
    assert any(f"rank 1: {lost} is missing" in msg for msg in out[0][1]), out[0][1]
