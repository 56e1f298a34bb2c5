"""Run a function in N real processes joined by a gloo process group, from inside pytest.

    from tests.dist_helpers import run_distributed
    results = run_distributed(my_fn, 2, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) -> picklable

Each process gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=<free
port>), so code under test initialises torch.distributed exactly as under torchrun (`init_process_group("gloo")` or
`training.engines.build_engine`). `init_gloo()` does that for tests that need a bare process group.
Results come back through files (no queue to deadlock on); a failing rank's traceback is raised in the parent,
and a hang (e.g. a peer died inside a collective) is killed after `timeout` seconds.
Processes are forked by default (about 2x faster to start than spawn); pass start_method="spawn" for a clean
interpreter (then `fn` must be importable at module level).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo():
    """Initialise the default process group from the environment set by run_distributed (idempotent)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _worker(fn, rank, world_size, port, out_dir, env, args, kwargs):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1", **(env or {})})
    import torch
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = ("ok", fn(rank, world_size, *args, **kwargs))
    except BaseException as e:  # report every failure, including asserts, to the parent
        result = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    try:
        import torch.distributed as dist
        if dist.is_initialized() and result[0] == "ok":
            dist.destroy_process_group()
    except Exception:
        pass
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, path)
    os._exit(0)  # skip atexit handlers of libraries (deepspeed, megatron) that may block in a forked child


def run_distributed(fn, world_size: int, *args, timeout: float = 180, start_method: str = "fork",
                    env: dict | None = None, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) in `world_size` processes; return the per-rank results."""
    ctx = mp.get_context(start_method)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="unidiff_dist_") as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, env, args, kwargs), daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.time() + timeout
        paths = [Path(out_dir) / f"rank{r}.pkl" for r in range(world_size)]
        errors = []
        while time.time() < deadline:
            done = [p.exists() for p in paths]
            if all(done):
                break
            # A rank that failed makes its peers hang in a collective: stop waiting once any error is in.
            for path in paths:
                if path.exists():
                    status, payload = pickle.loads(path.read_bytes())
                    if status == "error" and payload not in errors:
                        errors.append(payload)
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and not paths[r].exists()]
            if errors or dead:
                time.sleep(1.0)  # give the other ranks a moment to report their own errors
                break
            time.sleep(0.05)
        results, missing = [], []
        for r, path in enumerate(paths):
            if path.exists():
                status, payload = pickle.loads(path.read_bytes())
                if status == "error":
                    if payload not in errors:
                        errors.append(payload)
                    results.append(None)
                else:
                    results.append(payload)
            else:
                missing.append(r)
                results.append(None)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        if errors:
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            raise RuntimeError(f"ranks {missing} produced no result within {timeout}s (exit codes {codes}): "
                               "hang or crash")
        return results
