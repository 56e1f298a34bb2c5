"""Helpers for tests that submit jobs to the test cluster (tests/slurm_cluster.py): the CLI's argument namespace, a
reserved rendezvous port, job logs for failure messages, polling with a deadline, and the ranks' processes."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from tests.ports import reserve_ports

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/model/tiny.yaml"
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def launch_args(**kw) -> argparse.Namespace:
    """The namespace the CLI builds for `launch slurm` (every flag left out = None)."""
    base = {"words": [], "nodes": None, "gpus_per_node": None, "nproc": None, "cpus_per_task": None, "mem": None,
            "time": None, "partition": None, "account": None, "qos": None, "constraint": None, "env": [],
            "signal_lead": None, "command": "train", "array": False, "shards_per_task": None, "dry_run": False}
    return argparse.Namespace(**{**base, **kw})


def master_port() -> str:
    """The launch.master_port override for a test job whose ranks rendezvous. The default (0) has the head node's
    batch shell bind port 0, close it and let rank 0 bind it later: a race against anything that binds port 0
    meanwhile, and here the "nodes" are this machine, where other tests (xdist workers) do just that. A port
    outside the ephemeral range, claimed for this process (tests/ports.reserve_ports), cannot be taken in
    between. A requeued segment binds it again: the TCPStore server sets SO_REUSEADDR, so the previous segment's
    TIME_WAIT connections do not block it (measured)."""
    return f"launch.master_port={reserve_ports(1)[0]}"


def job_logs(run_dir: Path) -> str:
    out = []
    for f in sorted((run_dir / "slurm").glob("*.out")) + sorted((run_dir / "slurm").glob("*.log")):
        out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(out)


def wait_until(cond, timeout_s: float, why, every_s: float = 0.2):
    """Poll `cond()` until it returns something truthy (returned); fail with `why()` after `timeout_s`."""
    deadline = time.time() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.time() < deadline, why()
        time.sleep(every_s)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def rank_pids(config: Path) -> list[int]:
    """The python processes of `python -m launch.cli train CONFIG` (the job's ranks, after the srun task's `bash -c`
    has exec'd them). srun's and the wrapper shell's command lines name the config too, so argv[1:3] decides."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        m = argv.index("-m") if "-m" in argv else -2
        if argv[m - 1:m + 3] == [argv[0], "-m", "launch.cli", "train"] and str(config) in argv:
            pids.append(int(d.name))
    return sorted(pids)


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """Client commands (sbatch/sinfo from launch.slurm) talk to the test cluster; ranks use loopback for gloo."""
    for k in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(k, slurm_cluster.env[k])
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return slurm_cluster


def slurm_env_vars(cluster) -> dict[str, str]:
    return {**cluster.env, "GLOO_SOCKET_IFNAME": "lo", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
