"""train-decoder through the DeepSpeed engine (ZeRO data parallel) on 2 real gloo processes."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

TINY = ["decoder.image_size=16", "decoder.token_grid=2", "decoder.patch_size=4", "decoder.dim=32", "decoder.n_heads=2",
        "decoder.axes_dims=[4,6,6]", "decoder.n_layers=1", "decoder.cap_feat_dim=16", "decoder.t_mid_dim=32",
        "decoder.codebook_size=10", "decoder.batch_size=4", "decoder.train_steps=3", "decoder.warmup_steps=1",
        "decoder.engine=deepspeed", "tracking.wandb=disabled"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, zero: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from training.config import load_config
    from training.decoder.train import train_decoder

    cfg = load_config(None, TINY + [f"run.dir={run_dir}", "run.name=ds", f"decoder.zero_stage={zero}"])
    _, module = train_decoder(cfg, progress=False)
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("zero", [1, 2])
def test_deepspeed_two_ranks_end_identical(tmp_path, zero):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path / "runs"), zero, str(tmp_path)), nprocs=2,
                       start_method="spawn")
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
