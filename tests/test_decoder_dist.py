"""train-decoder through the trainer's engines (native all-reduce, DeepSpeed ZeRO) on 2 real gloo processes."""
from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.dist

TINY = ["decoder.image_size=16", "decoder.token_grid=2", "decoder.patch_size=4", "decoder.dim=32", "decoder.n_heads=2",
        "decoder.axes_dims=[4,6,6]", "decoder.n_layers=1", "decoder.cap_feat_dim=16", "decoder.t_mid_dim=32",
        "decoder.codebook_size=10", "decoder.batch_size=4", "decoder.train_steps=3", "decoder.warmup_steps=1",
        "decoder.engine=deepspeed", "tracking.wandb=disabled"]


def _worker(rank: int, world: int, run_dir: str, engine: str, zero: int, out: str) -> None:
    from training.config import load_config
    from training.decoder.train import train_decoder

    cfg = load_config(None, TINY + [f"run.dir={run_dir}", "run.name=ds", f"decoder.engine={engine}",
                                    f"decoder.zero_stage={zero}"])
    _, module = train_decoder(cfg, progress=False)
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine,zero", [("native", 0), ("deepspeed", 1), ("deepspeed", 2)])
def test_two_ranks_end_identical(tmp_path, engine, zero):
    """Each rank trains on its own pairs; the gradient reduction keeps the replicas equal (the native decoder
    stepped each rank's replica alone before it ran on the engines)."""
    run_distributed(_worker, 2, str(tmp_path / "runs"), engine, zero, str(tmp_path), start_method="spawn", timeout=280,
                    env={"DS_ACCELERATOR": "cpu"})
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    from training.config import load_config
    from training.decoder import checkpoint
    from training.decoder.sigvq import TokenDecoder

    cfg = load_config(None, TINY)
    torch.manual_seed(cfg.decoder.seed)  # the same start train_decoder builds
    init = TokenDecoder(cfg.decoder).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a)  # the ranks trained
    for k in a:
        assert torch.equal(a[k], b[k]), k
    step, state = checkpoint.load_latest(tmp_path / "runs" / "ds" / "decoder" / "checkpoints")
    assert step == 3
    changed = [k for k in a if not torch.equal(state["model"][k], a[k])]
    assert not changed, changed[:3]  # rank 0's checkpoint holds the trained weights


def _resume_worker(rank: int, world: int, run_dir: str, name: str) -> None:
    from training.config import load_config
    from training.decoder.train import train_decoder

    cfg = load_config(None, TINY + [f"run.dir={run_dir}", f"run.name={name}", "decoder.zero_stage=2",
                                    "decoder.train_steps=4", "decoder.save_every=2", "decoder.keep_last=0"])
    train_decoder(cfg, progress=False)
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(400)
def test_deepspeed_resume_from_a_periodic_checkpoint_is_exact(tmp_path):
    """ZeRO-2 on 2 ranks: resumed from the step-2 checkpoint of a 4-step run, the step-4 checkpoint is the
    uninterrupted one file by file (each rank's ZeRO partition of the AdamW moments, ZeRO's fp32 master slice
    refreshed from the loaded weights, the LR schedule, each rank's generator and data position)."""
    import json
    import shutil

    runs = tmp_path / "runs"
    run_distributed(_resume_worker, 2, str(runs), "whole", start_method="spawn", timeout=380,
                    env={"DS_ACCELERATOR": "cpu"})
    whole, again = runs / "whole" / "decoder" / "checkpoints", runs / "again" / "decoder" / "checkpoints"
    again.mkdir(parents=True)
    shutil.copytree(whole / "step_000002", again / "step_000002")
    (again / "latest").write_text("step_000002\n")
    run_distributed(_resume_worker, 2, str(runs), "again", start_method="spawn", timeout=380,
                    env={"DS_ACCELERATOR": "cpu"})

    def hashes(d):
        return {k: v["sha256"] for k, v in json.loads((d / "manifest.json").read_text())["files"].items()}

    assert hashes(again / "step_000004") == hashes(whole / "step_000004")
