"""`unidiff launch slurm CONFIG --nodes N --gpus-per-node G ...`: render an sbatch script into the run dir, submit it.

    runs/<name>/slurm/config.yaml        the resolved config every rank (and every requeue) reads
    runs/<name>/slurm/train.sbatch       the script (readable; its header says how it was made); resubmit with sbatch
    runs/<name>/slurm/<jobid>.out        the batch shell's log (rendezvous, signals, requeues), appended across requeues
    runs/<name>/slurm/<jobid>.rank<r>.log  each rank's output

`--array` renders the pretokenize job array (one task per range of raw shards) and a merge job that runs after all
tasks succeeded. The design (srun task per rank, B:USR1 pre-timeout signal, requeue) is explained in docs/slurm.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from launch.config import REDACTED, LaunchConfig, is_secret, redact_override
from training.engines.world import check_layout
from launch.registry import check_command
from training.config import ConfigError, save_config

TEMPLATES = Path(__file__).parent / "templates"
# CLI flag -> LaunchConfig field; flags left out keep the config's value
FLAG_FIELDS = {"nodes": "nodes", "gpus_per_node": "gpus_per_node", "nproc": "nproc", "cpus_per_task": "cpus_per_task",
               "mem": "mem", "time": "time", "partition": "partition", "account": "account", "qos": "qos",
               "constraint": "constraint", "signal_lead": "signal_lead_s", "shards_per_task": "shards_per_task"}


class LaunchError(RuntimeError):
    """The launch cannot go ahead (no sbatch, unknown partition, sbatch refused); the message says what to do."""


def add_flags(p) -> None:
    p.add_argument("--nodes", type=int, help="nodes (default launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node, one rank each (default launch.gpus_per_node)")
    p.add_argument("--nproc", type=int, help="ranks per node when there are no GPUs (default launch.nproc)")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per rank")
    p.add_argument("--mem", help="memory per node, e.g. 500G")
    p.add_argument("--time", help="time limit, [D-]HH:MM:SS")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--qos", help="SLURM QOS")
    p.add_argument("--constraint", help="node features, e.g. h100")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for every rank")
    p.add_argument("--signal-lead", type=int, help="seconds before the time limit to save and requeue")
    p.add_argument("--command", default="train", help="unidiff command each rank runs (default train)")
    p.add_argument("--array", action="store_true", help="pretokenize as a job array (one task per shard range) "
                                                        "plus a manifest merge job")
    p.add_argument("--shards-per-task", type=int, help="--array: raw shards per array task")
    p.add_argument("--dry-run", action="store_true", help="print the script(s), submit nothing")


def resolve(cfg, args) -> LaunchConfig:
    """cfg.launch with the flags that were given applied, validated."""
    changes = {f: getattr(args, a) for a, f in FLAG_FIELDS.items() if getattr(args, a, None) is not None}
    env = dict(cfg.launch.env)
    for kv in getattr(args, "env", None) or []:
        if "=" not in kv:
            raise ConfigError(f"--env {kv!r} is not allowed: must be KEY=VALUE")
        k, v = kv.split("=", 1)
        env[k] = v
    if "gpus_per_node" in changes and "nproc" not in changes:
        changes["nproc"] = 0  # one rank per GPU
    lc = dataclasses.replace(cfg.launch, env=env, **changes)
    lc.validate(cfg)
    return lc


def render(template: str, values: dict) -> str:
    """Fill `{{name}}` placeholders; a placeholder without a value is a bug in the caller, not a blank."""
    text = (TEMPLATES / template).read_text()
    missing = sorted(set(re.findall(r"\{\{(\w+)\}\}", text)) - set(values))
    if missing:
        raise KeyError(f"{template}: no value for {missing}")
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), text)
    return re.sub(r"\n{3,}", "\n\n", text)


def _resource_lines(lc: LaunchConfig) -> str:
    opts = [("gpus-per-node", lc.gpus_per_node or ""), ("cpus-per-task", lc.cpus_per_task or ""), ("mem", lc.mem),
            ("time", lc.time), ("partition", lc.partition), ("account", lc.account), ("qos", lc.qos),
            ("constraint", lc.constraint)]
    return "\n".join(f"#SBATCH --{k}={v}" for k, v in opts if v != "")


def _env_lines(lc: LaunchConfig) -> str:
    """launch.env as exports; a secret is exported by name only: its value comes from the environment sbatch runs in
    (sbatch's default --export=ALL carries it into the job), so no script on disk holds it."""
    if not lc.env:
        return "# (no launch.env / --env entries)"
    lines = []
    for k, v in sorted(lc.env.items()):
        if is_secret(k):
            lines += [f': "${{{k}:?launch.env.{k} is a secret, passed only through the environment of sbatch, which '
                      f'lacked it}}"', f"export {k}"]
        else:
            lines.append(f"export {k}={shlex.quote(str(v))}")
    return "\n".join(lines)


def _header(kind: str, argv_text: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{kind}, made by `{argv_text}` on {socket.gethostname()} at {now}."


def unidiff_command(command: str, config: Path) -> str:
    """The command line every rank/task runs: this interpreter (so the same venv; compute nodes must share the
    filesystem) on the CLI, with the resolved config snapshot."""
    return f"{shlex.quote(sys.executable)} -m launch.cli {command} {shlex.quote(str(config))}"


def render_train_script(lc: LaunchConfig, job_name: str, log_dir: Path, workdir: Path, rank_command: str,
                        script_path: Path, header: str) -> str:
    nproc = lc.ranks_per_node()
    srun_flags = f" --cpus-per-task={lc.cpus_per_task}" if lc.cpus_per_task else ""
    return render("sbatch.sh.tmpl", {
        "header": header, "job_name": lc.job_name or job_name, "nodes": lc.nodes, "nproc": nproc,
        "resource_lines": _resource_lines(lc), "workdir": workdir, "log_dir": log_dir,
        "signal_lead_s": lc.signal_lead_s, "requeue_flag": "--requeue" if lc.requeue else "--no-requeue",
        "env_lines": _env_lines(lc),
        "master_port": lc.master_port, "python": shlex.quote(sys.executable),
        "srun_flags": srun_flags, "command": rank_command, "requeue": int(lc.requeue),
        "max_requeues": lc.max_requeues, "script": script_path})


def raw_shards(dcfg) -> list[Path]:
    """Raw shards in the order pretokenize numbers them for `--shards A:B` (train/*.tar, then val/*.tar, sorted)."""
    try:
        from data_pipeline.pretokenize import list_raw_shards
    except ImportError:
        raw = Path(dcfg.raw_dir)
        return [p for split in ("train", "val") for p in sorted((raw / split).glob("*.tar"))]
    return list(list_raw_shards(dcfg))


def render_array_scripts(lc: LaunchConfig, job_name: str, log_dir: Path, workdir: Path, task_command: str,
                         num_shards: int, merge_path: Path, header: str) -> tuple[str, str]:
    tasks = -(-num_shards // lc.shards_per_task)
    common = {"job_name": f"{lc.job_name or job_name}-pretok", "workdir": workdir, "log_dir": log_dir,
              "env_lines": _env_lines(lc), "command": task_command,
              "resource_lines": _resource_lines(dataclasses.replace(lc, gpus_per_node=min(lc.gpus_per_node, 1)))}
    array = render("pretokenize_array.sh.tmpl", {
        **common, "header": header, "shards_per_task": lc.shards_per_task, "num_shards": num_shards,
        "last_task": tasks - 1, "throttle": f"%{lc.max_parallel_tasks}" if lc.max_parallel_tasks else "",
        "merge_script": merge_path})
    merge = render("pretokenize_merge.sh.tmpl", {**common, "header": header.replace("job array", "merge job"),
                                                 "resource_lines": _resource_lines(dataclasses.replace(
                                                     lc, gpus_per_node=0))})
    return array, merge


# ------------------------------------------------------------------------------------------------- cluster calls

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"`{name}` is not on PATH: run `unidiff launch slurm` on a SLURM login node (or add the "
                          f"SLURM client commands to PATH); --dry-run prints the script without submitting")
    return path


def check_partition(partition: str) -> None:
    if not partition:
        return
    r = subprocess.run([_tool("sinfo"), "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise LaunchError(f"sinfo failed (rc={r.returncode}): {r.stderr.strip()}")
    known = sorted(set(r.stdout.split()))
    if partition not in known:
        raise LaunchError(f"launch.partition={partition} is not a partition of this cluster; known partitions: "
                          f"{', '.join(known) or '(none)'} (set --partition or launch.partition)")


def check_not_running(slurm_dir: Path) -> None:
    """Two jobs training into one run dir would overwrite each other's checkpoints: refuse while the last job
    submitted for this run is still queued or running."""
    ids = (slurm_dir / "jobs.txt").read_text().split() if (slurm_dir / "jobs.txt").exists() else []
    if not ids:
        return
    r = subprocess.run([_tool("squeue"), "-h", "-j", ids[-1], "-o", "%T"], capture_output=True, text=True, timeout=60)
    state = r.stdout.strip() if r.returncode == 0 else ""
    if state:
        raise LaunchError(f"job {ids[-1]} of this run ({slurm_dir.parent}) is still {state}: `scancel {ids[-1]}` "
                          f"first, or choose another run.name")


def submit(script: Path, extra: list[str] | None = None, secrets: dict[str, str] | None = None) -> str:
    """sbatch the script, with `secrets` added to its environment (the job inherits them); returns the job id."""
    r = subprocess.run([_tool("sbatch"), "--parsable", *(extra or []), str(script)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(secrets or {})})
    if r.returncode != 0:
        raise LaunchError(f"sbatch {script} failed (rc={r.returncode}): {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


def _argv_text(args) -> str:
    words = ["unidiff", "launch", "slurm", *map(redact_override, getattr(args, "words", []))]
    for a in (*FLAG_FIELDS, "command"):
        v = getattr(args, a, None)
        if v is not None and not (a == "command" and v == "train"):
            words += [f"--{a.replace('_', '-')}", str(v)]
    for kv in getattr(args, "env", None) or []:
        k = kv.split("=", 1)[0]
        words += ["--env", f"{k}={REDACTED}" if is_secret(k) else kv]
    words += ["--array"] if getattr(args, "array", False) else []
    return " ".join(shlex.quote(w) for w in words)


def launch_slurm(cfg, args, rank_command: str | None = None) -> list[str]:
    """Render (and unless args.dry_run, write and submit) the job(s). Returns the job ids (empty on a dry run).
    `rank_command` replaces what each rank / array task runs (tests use it for a stand-in workload)."""
    lc = resolve(cfg, args)
    run_dir = cfg.run_dir.resolve()
    slurm_dir = run_dir / "slurm"
    workdir = Path.cwd().resolve()
    config_snapshot = slurm_dir / "config.yaml"
    dry = bool(getattr(args, "dry_run", False))
    if getattr(args, "array", False):
        return _launch_array(cfg, args, lc, slurm_dir, workdir, config_snapshot, dry, rank_command)
    command = getattr(args, "command", None) or "train"
    check_command(command)
    check_layout(cfg, lc.nodes * lc.ranks_per_node(), lc.nodes, lc.gpus_per_node, train_batch=command == "train")
    script_path = slurm_dir / f"{command.replace(' ', '-')}.sbatch"
    text = render_train_script(lc, cfg.run.name, slurm_dir, workdir,
                               rank_command or unidiff_command(command, config_snapshot), script_path,
                               _header(f"SLURM job for `unidiff {command}`", _argv_text(args)))
    if dry:
        print(text)
        return []
    _prepare_submission(cfg, lc, slurm_dir, config_snapshot)
    script_path.write_text(text)
    job = submit(script_path, secrets=lc.secrets())
    with open(slurm_dir / "jobs.txt", "a") as f:
        f.write(job + "\n")
    print(f"submitted job {job}: {lc.nodes} node(s) x {lc.ranks_per_node()} rank(s) of `unidiff {command}`; "
          f"script {script_path}, logs {slurm_dir}/{job}.out")
    return [job]


def _prepare_submission(cfg, lc, slurm_dir: Path, config_snapshot: Path) -> None:
    """Checks before any sbatch (tool present, partition known, no job of this run queued), then the snapshot."""
    _tool("sbatch")
    check_partition(lc.partition)
    check_not_running(slurm_dir)
    slurm_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, config_snapshot)


def _launch_array(cfg, args, lc, slurm_dir: Path, workdir: Path, config_snapshot: Path, dry: bool,
                  task_command: str | None = None) -> list[str]:
    shards = raw_shards(cfg.data)
    if not shards:
        raise ConfigError(f"data.raw_dir={cfg.data.raw_dir} holds no raw shards (train/*.tar, val/*.tar): run "
                          f"`unidiff data make-sample` or point data.raw_dir at your shards")
    merge_path = slurm_dir / "pretokenize-merge.sbatch"
    array_path = slurm_dir / "pretokenize-array.sbatch"
    header = _header("SLURM job array for `unidiff pretokenize`", _argv_text(args))
    array, merge = render_array_scripts(lc, cfg.run.name, slurm_dir, workdir,
                                        task_command or unidiff_command("pretokenize", config_snapshot),
                                        len(shards), merge_path,
                                        header)
    tasks = -(-len(shards) // lc.shards_per_task)
    if dry:
        print(f"{array}\n# ---- then, with --dependency=afterok:<array job id>:\n{merge}")
        return []
    _prepare_submission(cfg, lc, slurm_dir, config_snapshot)
    array_path.write_text(array)
    merge_path.write_text(merge)
    array_job = submit(array_path, secrets=lc.secrets())
    merge_job = submit(merge_path, [f"--dependency=afterok:{array_job}", "--kill-on-invalid-dep=yes"], lc.secrets())
    with open(slurm_dir / "jobs.txt", "a") as f:
        f.write(f"{array_job}\n{merge_job}\n")
    print(f"submitted pretokenize array job {array_job} ({tasks} task(s) over {len(shards)} raw shard(s)) and "
          f"merge job {merge_job}; scripts in {slurm_dir}")
    return [array_job, merge_job]


def cmd_launch_slurm(cfg, args) -> int:
    try:
        launch_slurm(cfg, args)
    except LaunchError as e:
        print(f"unidiff launch slurm: {e}", file=sys.stderr)
        return 2
    return 0
