"""`unidiff launch local CONFIG --nproc N [overrides]`: torchrun on this machine, N ranks of `unidiff train`.

torchrun (`--standalone`: a private rendezvous on a free localhost port, so parallel launches never clash) sets
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each rank; the engine picks nccl on GPUs and gloo on
CPU. Ctrl-C / SIGTERM reach torchrun, which forwards them to the ranks (the trainer saves and exits).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from launch.config import redact_override
from training.engines.world import check_layout
from launch.registry import check_command
from training import accelerator
from training.config_errors import ConfigError


def add_flags(p) -> None:
    p.add_argument("--nproc", type=int, help="ranks on this machine (default launch.nproc; 0 = one per GPU, or 1)")
    p.add_argument("--command", default="train", help="unidiff command each rank runs (default train)")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command, run nothing")


def _visible_gpus() -> int:
    return accelerator.gpus_visible()


def torchrun_argv(nproc: int, command: str, words: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "-m", "launch.cli", *command.split(), *words]


def rank_env(cfg, nproc: int) -> dict[str, str]:
    """This environment + launch.env (secrets too: the environment is how they reach the ranks); CPU threads split
    between the ranks unless OMP_NUM_THREADS is set."""
    env = {**os.environ, **cfg.launch.env_to_set()}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def cmd_launch_local(cfg, args) -> int:
    command = getattr(args, "command", None) or "train"
    check_command(command)
    nproc = args.nproc if getattr(args, "nproc", None) is not None else cfg.launch.nproc
    if nproc < 0:
        raise ConfigError(f"--nproc {nproc} is not allowed: must be >= 0 (0 = one per GPU, or 1)")
    nproc = nproc or _visible_gpus() or 1
    check_layout(cfg, nproc, train_batch=command == "train")
    # The same words the user gave (config + overrides): ranks resolve the config exactly as this process did, but
    # for secret values, which would show in `ps` and in the line below: the ranks get them from rank_env.
    words = [redact_override(w) for w in args.words if w.endswith((".yaml", ".yml")) or
             ("=" in w and not w.startswith("-"))]
    argv = torchrun_argv(nproc, command, words)
    print(f"launch local: {' '.join(shlex.quote(a) for a in argv)}", file=sys.stderr, flush=True)
    if getattr(args, "dry_run", False):
        return 0
    return subprocess.run(argv, env=rank_env(cfg, nproc)).returncode
