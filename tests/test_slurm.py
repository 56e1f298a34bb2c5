"""`unidiff launch slurm` against a real SLURM (slurmctld + two slurmd, emulated nodes n1/n2, started by
tests/slurm_cluster.py), plus rendering and error checks that need no cluster. The real trainer as a SLURM job
(preemption, chained requeues, external requeue) is in tests/test_slurm_train.py.

All pytest-xdist workers of a run share one cluster (tests/slurm_cluster.py counts its users); the xdist_group
mark below keeps the slurm tests on one worker where `--dist loadgroup` groups (it does not with pytest 9.2 +
xdist 3.8: xdist renames `item._nodeid`, which pytest 9 no longer reads).
"""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time

import pytest

from launch.config import LaunchConfig, time_limit_seconds
from training.engines.world import check_layout
from launch.slurm import LaunchError, launch_slurm, render_array_scripts
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: the real cluster)
from tests.slurm_jobs import FINAL, TINY, job_logs, launch_args, master_port, slurm_env  # noqa: F401
from training.config import ConfigError, load_config

pytestmark = pytest.mark.xdist_group("slurm")


# ------------------------------------------------------------------------------------------- no cluster needed

@pytest.mark.unit
def test_dry_run_prints_a_valid_script_and_writes_nothing(tmp_path, capsys):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=r", "train.global_batch_size=16"])
    ids = launch_slurm(cfg, launch_args(nodes=2, gpus_per_node=4, time="01:00:00", partition="gpu",
                                        env=["NCCL_DEBUG=INFO", "X=a b"], signal_lead=120, dry_run=True))
    text = capsys.readouterr().out
    assert ids == [] and not (tmp_path / "r").exists()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=01:00:00", "#SBATCH --partition=gpu", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "export NCCL_DEBUG=INFO", "export X='a b'",
                 "trap 'forward USR1' USR1", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in text, line
    assert "unidiff launch slurm" in text.splitlines()[1]  # the header says how it was made
    assert "{{" not in text
    script = tmp_path / "s.sh"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0  # bash parses it


@pytest.mark.unit
def test_array_scripts_cover_every_shard_once(tmp_path):
    lc = LaunchConfig(shards_per_task=3, max_parallel_tasks=2)
    array, merge = render_array_scripts(lc, "r", tmp_path, tmp_path, "python -m launch.cli pretokenize c.yaml", 7,
                                        tmp_path / "m.sbatch", "header")
    assert "#SBATCH --array=0-2%2" in array and 'exec python -m launch.cli pretokenize c.yaml --shards "$FIRST:$END"' \
        in array and merge.rstrip().endswith("--merge")
    # Run the array script's range arithmetic in bash for every task id: the ranges tile [0, 7) exactly.
    body = array.split("FIRST=", 1)[1].split("echo", 1)[0]
    got = []
    for task in range(3):
        r = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID={task}; FIRST={body} echo $FIRST $END"],
                           capture_output=True, text=True, check=True)
        got.append(tuple(map(int, r.stdout.split())))
    assert got == [(0, 3), (3, 6), (6, 7)]


def check_world(cfg, nodes, per_node, gpus_per_node=0):
    return check_layout(cfg, nodes * per_node, nodes, gpus_per_node)


@pytest.mark.unit
def test_layout_errors_name_the_fix():
    cfg = load_config(TINY, ["parallel.tensor=2", "train.global_batch_size=8", "train.micro_batch_size=1"])
    assert check_world(cfg, 2, 2) == 2
    with pytest.raises(ConfigError, match="not divisible by parallel.tensor"):
        check_world(cfg, 1, 3)  # 3 ranks cannot hold TP groups of 2
    with pytest.raises(ConfigError, match="must stay inside a node"):
        check_world(cfg, 2, 1)
    with pytest.raises(ConfigError, match="at most 8 data-parallel ranks"):
        check_world(cfg, 4, 6)  # 24 ranks / TP 2 = 12 DP ranks > 8 sequences per step
    with pytest.raises(ConfigError, match="one rank drives one GPU"):
        check_world(cfg, 1, 2, gpus_per_node=4)
    with pytest.raises(ConfigError, match="launch.nproc=2 is not allowed"):
        launch_slurm(cfg, launch_args(gpus_per_node=4, nproc=2, dry_run=True))
    ep = load_config(TINY, ["parallel.expert=4"])
    with pytest.raises(ConfigError, match="parallel.expert"):
        check_world(ep, 1, 2)


@pytest.mark.unit
def test_time_limits_and_signal_lead():
    assert [time_limit_seconds(t) for t in ("30", "10:00", "01:00:00", "2-00", "1-02:03:04", "x")] == \
        [1800, 600, 3600, 172800, 93784, None]
    with pytest.raises(ConfigError, match="signal_lead_s=600 is not allowed: must be shorter than launch.time"):
        LaunchConfig(time="00:05:00", signal_lead_s=600).validate(None)
    with pytest.raises(ConfigError, match="launch.time=soon"):
        LaunchConfig(time="soon").validate(None)


@pytest.mark.unit
def test_missing_sbatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client here
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=r"])
    with pytest.raises(LaunchError, match="`sbatch` is not on PATH.*--dry-run"):
        launch_slurm(cfg, launch_args(nodes=1))
    assert not (tmp_path / "r" / "slurm").exists()


# ------------------------------------------------------------------------------------------- real SLURM

@pytest.mark.slurm
def test_unknown_partition_lists_the_known_ones(slurm_env, tmp_path):
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=r"])
    with pytest.raises(LaunchError, match="launch.partition=nope is not a partition.*known partitions: debug"):
        launch_slurm(cfg, launch_args(nodes=2, partition="nope"))


# A TEST WORKLOAD, not part of unidiff: it stands in for `unidiff train` where the test is about the job script
# (the real pre-timeout timer, requeue, restart count), so each step costs a fixed, known time. It keeps the
# trainer's contract: torchrun-style env -> a real gloo group; USR1/TERM -> all ranks agree, save at the end of the
# step, exit 0; resume from checkpoints/latest; one metrics.jsonl line per step.
STAND_IN = r'''
import signal
stop = []
for s in (signal.SIGUSR1, signal.SIGTERM):  # first thing: an early signal must be recorded, never fatal
    signal.signal(s, lambda n, f: stop.append(n))
import json, os, sys, time
from pathlib import Path
import torch
import torch.distributed as dist

run_dir, steps, step_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo")
ckpt, x, start = run_dir / "checkpoints", 1.0, 0
if (ckpt / "latest").exists():
    state = json.loads((ckpt / (ckpt / "latest").read_text() / "state.json").read_text())
    x, start = state["x"], state["step"]
    print(f"rank {rank}: resumed at step {start}", flush=True)
log = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
for step in range(start, steps):
    g = torch.tensor([(rank + 1) * x], dtype=torch.float64)
    dist.all_reduce(g)
    x = x - 0.01 * float(g)
    if log:
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        log.write(json.dumps({"step": step, "loss": x * x, "restart": restart}) + "\n")
        log.flush()
    time.sleep(step_s)
    flag = torch.tensor([int(bool(stop))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() or step + 1 == steps:
        if rank == 0:
            d = ckpt / f"step_{step + 1}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "state.json").write_text(json.dumps({"x": x, "step": step + 1}))
            (ckpt / "latest.tmp").write_text(d.name)
            os.replace(ckpt / "latest.tmp", ckpt / "latest")
        dist.barrier()
        if flag.item():
            print(f"rank {rank}: saved and stopping at step {step + 1} (signal {stop[0] if stop else 'seen by a peer first'})", flush=True)
            break
dist.destroy_process_group()
for s in (signal.SIGUSR1, signal.SIGTERM):  # as `unidiff train`: a signal still in flight must not kill the exit
    signal.signal(s, signal.SIG_IGN)
'''


@pytest.mark.slurm
def test_time_limit_signal_saves_requeues_and_resumes(slurm_env, tmp_path):
    """The real pre-timeout path: sbatch --time + --signal=B:USR1@lead from the rendered header; SLURM's timer
    fires, the ranks save, the script requeues, the requeued run resumes and completes."""
    cluster = slurm_env
    run_dir = tmp_path / "runs" / "timer"
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    steps = 100  # 0.5 s each: 50 s of work, longer than the at most ~40 s until the signal below
    cfg = load_config(TINY, [f"run.dir={tmp_path / 'runs'}", "run.name=timer", master_port()])
    # Limit 2 min, lead 80 s: due 40 s in; slurmctld checks limits about every 30 s and may send it early (here it
    # came 28 s after the start). The work (50 s) outlasts that, so the first segment is always interrupted.
    [job] = launch_slurm(cfg, launch_args(nodes=2, time="2", signal_lead=80),
                         rank_command=f"{sys.executable} {tmp_path / 'stand_in.py'} {run_dir} {steps} 0.5")
    with pytest.raises(LaunchError, match=f"job {job} of this run .* is still (PENDING|RUNNING)"):
        launch_slurm(cfg, launch_args(nodes=2), rank_command="true")  # a second job into the same run dir
    t0 = time.time()
    while cluster.job(job).get("Restarts") != "1":  # signal -> save -> requeue
        assert time.time() - t0 < 150 and cluster.job(job).get("JobState") not in FINAL, job_logs(run_dir)
        time.sleep(0.5)
    # The requeued run gets a longer limit so that this test needs exactly one requeue.
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    info = cluster.wait_state(job, FINAL, timeout_s=180)
    logs = job_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    assert "got SIGUSR1" in logs and "requeueing job" in logs and "resumed at step" in logs, logs
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps)), "every step exactly once across the requeue"
    assert {r["restart"] for r in rows} == {"0", "1"}
    x, world = 1.0, 2  # the uninterrupted trajectory, computed here
    for r in rows:
        x = x - 0.01 * sum(k + 1 for k in range(world)) * x
        assert r["loss"] == pytest.approx(x * x, rel=1e-12)


# A TEST WORKLOAD standing in for `unidiff pretokenize --shards A:B | --merge`: it records which raw shards each
# array task was given, and the merge fails unless every shard was done before it started.
STAND_IN_PRETOKENIZE = r'''
import json, os, sys
from pathlib import Path
raw, out, flag = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
shards = [p for split in ("train", "val") for p in sorted((raw / split).glob("*.tar"))]
out.mkdir(parents=True, exist_ok=True)
if flag == "--shards":
    a, b = map(int, sys.argv[4].split(":"))
    for i in range(a, b):
        (out / f"{shards[i].parent.name}-{shards[i].name}.done").write_text(str(i))
    with open(out / "tasks.log", "a") as f:
        f.write(f"{os.environ['SLURM_ARRAY_TASK_ID']} {a}:{b}\n")
else:
    missing = [p.name for p in shards if not (out / f"{p.parent.name}-{p.name}.done").exists()]
    if missing:
        sys.exit(f"merge: shards not done: {missing}")
    (out / "manifest.json").write_text(json.dumps(sorted(p.name for p in out.glob("*.done"))))
'''


@pytest.mark.slurm
def test_array_tasks_tile_the_shards_and_merge_runs_after_all(slurm_env, tmp_path):
    """The job array + afterok merge job on the real scheduler, with a stand-in per-shard command."""
    cluster = slurm_env
    raw = tmp_path / "raw"
    for split, n in (("train", 5), ("val", 2)):
        (raw / split).mkdir(parents=True)
        for i in range(n):
            (raw / split / f"{split}-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "pt.py").write_text(STAND_IN_PRETOKENIZE)
    cfg = load_config(TINY, [f"run.dir={tmp_path / 'runs'}", "run.name=arr", f"data.raw_dir={raw}"])
    array_job, merge_job = launch_slurm(cfg, launch_args(array=True, shards_per_task=3),
                                        rank_command=f"{sys.executable} {tmp_path / 'pt.py'} {raw} {tmp_path / 'out'}")
    info = cluster.wait_state(merge_job, FINAL, timeout_s=180)
    assert info["JobState"] == "COMPLETED", job_logs(tmp_path / "runs" / "arr")
    tasks = sorted(tuple(line.split()) for line in (tmp_path / "out" / "tasks.log").read_text().splitlines())
    assert tasks == [("0", "0:3"), ("1", "3:6"), ("2", "6:7")]
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())) == 7
    assert info["Dependency"] in ("(null)", ""), info  # the afterok dependency was satisfied, not dropped
    assert cluster.job(f"{array_job}_0").get("JobState") == "COMPLETED"


def _pretokenize_supports_shards() -> str | None:
    from data_pipeline import pretokenize as pt

    if "shards" not in inspect.signature(pt.pretokenize).parameters or not hasattr(pt, "merge_manifest"):
        return ("data_pipeline.pretokenize has no shard-range interface yet (pretokenize(..., shards=(a, b)), "
                "merge_manifest(dcfg), `unidiff pretokenize --shards A:B | --merge`; see docs/slurm.md)")
    return None


@pytest.mark.slurm
def test_pretokenize_array_matches_local_run(slurm_env, tmp_path):
    """Test 3: the array job (2 shards per task) + merge produce the same token shards and manifest as one local
    pretokenize run."""
    reason = _pretokenize_supports_shards()
    if reason:
        pytest.skip(reason)
    from data_pipeline.image_tokenizer.fit_codebook import fit_codebook
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.sample import make_sample

    cluster = slurm_env
    over = [f"run.dir={tmp_path / 'runs'}", "run.name=pt", f"data.raw_dir={tmp_path / 'raw'}",
            f"data.image_tokenizer.path={tmp_path / 'itok'}", "data.image_tokenizer.kmeans_iters=4",
            "data.sample.train_scenes=60", "data.sample.val_scenes=20", "data.sample.train_docs=6",
            "data.sample.val_docs=3", "data.sample.shards_per_split=3", "data.pretokenize_workers=1"]
    local = load_config(TINY, [*over, f"data.token_dir={tmp_path / 'tok_local'}"])
    make_sample(local.data.raw_dir, local.data.sample, progress=False)
    fit_codebook(local.data, progress=False)
    pretokenize(local.data, progress=False)
    cfg = load_config(TINY, [*over, f"data.token_dir={tmp_path / 'tok_slurm'}"])
    ids = launch_slurm(cfg, launch_args(array=True, shards_per_task=2))
    assert len(ids) == 2
    run_dir = tmp_path / "runs" / "pt"
    info = cluster.wait_state(ids[1], FINAL, timeout_s=300)
    assert info["JobState"] == "COMPLETED", job_logs(run_dir)
    a, b = tmp_path / "tok_local", tmp_path / "tok_slurm"
    shards_a = sorted(p.relative_to(a) for p in a.rglob("*.tar"))
    assert shards_a == sorted(p.relative_to(b) for p in b.rglob("*.tar")) and len(shards_a) == 6
    for rel in shards_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
