"""Run a function in N real processes joined by a gloo process group, from inside pytest.

    from tests.dist_helpers import run_distributed
    results = run_distributed(my_fn, 2, arg1, arg2)   # my_fn(rank, world_size, arg1, arg2) -> picklable

Each process gets the environment torchrun gives its workers: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1,
MASTER_PORT and TORCHELASTIC_USE_AGENT_STORE=True. The rendezvous store is a TCPStore owned by the calling (pytest)
process, as torchrun's agent owns one: created on port 0, so the kernel picks the port and it stays bound until the
ranks are done. No port is ever picked, released and bound again later, which raced against other pytest-xdist
workers (EADDRINUSE). With those variables torch's env:// rendezvous connects every rank, rank 0 included, as a
client of that store, so code under test initialises torch.distributed exactly as under torchrun
(`init_process_group("gloo")` or `training.engines.build_engine`). `init_gloo()` does that for tests that need a
bare process group.
Results come back through files (no queue to deadlock on); a failing rank's traceback is raised in the parent,
and a hang (e.g. a peer died inside a collective) is killed after `timeout` seconds.
Processes are forked by default (about 2x faster to start than spawn); pass start_method="spawn" for a clean
interpreter (then `fn` must be importable at module level).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path


def init_gloo():
    """Initialise the default process group from the environment set by run_distributed (idempotent)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _worker(fn, rank, world_size, rendezvous, out_dir, env, args, kwargs):
    port, ready = rendezvous
    if not ready.wait(60):  # the parent creates the store after forking every rank (see run_distributed)
        os._exit(1)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), **rendezvous_env(port.value),
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


def rendezvous_env(port: int) -> dict[str, str]:
    """What torchrun's agent tells its workers about the store it owns: every rank (rank 0 too) joins the TCPStore
    at 127.0.0.1:port as a client (torch/distributed/rendezvous.py `_create_c10d_store`) instead of rank 0 binding
    MASTER_PORT itself."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": "0"}


def rendezvous_store(world_size: int):
    """A TCPStore server on a port the kernel assigns (port 0) and that stays bound while the caller holds it."""
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)


def run_distributed(fn, world_size: int, *args, timeout: float = 180, start_method: str = "fork",
                    env: dict | None = None, **kwargs) -> list:
    """Run fn(rank, world_size, *args, **kwargs) in `world_size` processes; return the per-rank results."""
    ctx = mp.get_context(start_method)
    rendezvous = (ctx.Value("i", 0), ctx.Event())  # the store's port, and "it is set"
    store = None
    with tempfile.TemporaryDirectory(prefix="unidiff_dist_") as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, rendezvous, out_dir, env, args, kwargs),
                             daemon=False)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        # The store is created only after every rank is forked, never before: its server is a thread of this
        # process, and a rank forked while that thread serves an earlier rank inherits whatever lock the thread
        # holds at that instant, locked for good. Measured with 4 forked ranks doing init_process_group("gloo") +
        # all_reduce: store created before the forks, 11 of 40 runs hung (gdb on a stuck rank: blocked on glibc's
        # resolver lock, in getnameinfo while creating its TCPStore client, a lock no thread of the rank holds); store
        # created after the forks, 0 of 100. This order also keeps the store's listening socket and event-loop
        # fds out of the ranks: they never hold, touch or finalize the parent's store. spawn (fork + exec) would
        # be safe either way; both start methods take this path.
        try:
            store = rendezvous_store(world_size)
        except BaseException:
            for p in procs:
                p.kill()
                p.join(timeout=5)
            raise
        rendezvous[0].value = store.port
        rendezvous[1].set()
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
        del store  # the last reference: the server stops and the port is released, after every rank is gone
        if errors:
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors))
        if missing:
            codes = {r: procs[r].exitcode for r in missing}
            raise RuntimeError(f"ranks {missing} produced no result within {timeout}s (exit codes {codes}): "
                               "hang or crash")
        return results
