"""train-decoder through the DeepSpeed engine (ZeRO data parallel) on 2 real gloo processes."""
from __future__ import annotations

import pytest
import torch

from tests.dist_helpers import run_distributed

pytestmark = pytest.mark.dist

TINY = ["decoder.image_size=16", "decoder.token_grid=2", "decoder.patch_size=4", "decoder.dim=32", "decoder.n_heads=2",
        "decoder.axes_dims=[4,6,6]", "decoder.n_layers=1", "decoder.cap_feat_dim=16", "decoder.t_mid_dim=32",
        "decoder.codebook_size=10", "decoder.batch_size=4", "decoder.train_steps=3", "decoder.warmup_steps=1",
        "decoder.engine=deepspeed", "tracking.wandb=disabled"]


def _worker(rank: int, world: int, run_dir: str, zero: int, out: str) -> None:
    from training.config import load_config
    from training.decoder.train import train_decoder

    cfg = load_config(None, TINY + [f"run.dir={run_dir}", "run.name=ds", f"decoder.zero_stage={zero}"])
    _, module = train_decoder(cfg, progress=False)
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_two_ranks_end_identical(tmp_path, zero):
    run_distributed(_worker, 2, str(tmp_path / "runs"), zero, str(tmp_path), start_method="spawn", timeout=280,
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
