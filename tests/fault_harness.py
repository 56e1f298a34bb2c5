"""A fault-injection harness of the project's own: SIGKILL a command and everything it started at seeded random
moments, rerun the same command until it completes, and compare what it left with an uninterrupted run.

    ref = run_uninterrupted(cmd_ref, timeout_s=...)                  # timings pick the kill moments
    report = run_with_kills(cmd, seed=..., kills=12, steps=..., save_every=..., timings=ref, timeout_s=...)
    assert not compare_metrics(ref.run_dir, cmd.run_dir, steps), report.describe()

Kill moments (chosen per attempt by a `random.Random(seed)`; a kill is an injected fault, never a synchronisation):
  startup     a uniform delay in [0, the uninterrupted run's time to its first step] (imports, engine build,
              checkpoint load), or this attempt's first logged step if that comes sooner
  step        as soon as this attempt has logged step T, T in [resume step, resume step + 3]: between steps, and
              right before or inside the periodic save that follows a logged step
  checkpoint  as soon as a `checkpoints/.tmp_step_*` dir this attempt creates (or clears: a leftover of an earlier
              kill) holds >= K files (K in 0..4): inside a checkpoint write; if polling missed the write, as soon as
              `latest` moves
  latest      as soon as `checkpoints/latest` names a new checkpoint: during pruning, or early in the next step
Each trigger fires at the latest when the attempt's first new checkpoint is complete, and near the end (the last
periodic checkpoint still to come) only startup kills are drawn, so a kill never lets the run finish before the
requested number of kills is reached.

Every process of an attempt carries a tag in its environment (UNIDIFF_FAULT_TAG); the harness finds them in /proc
even when they live in sessions of their own (torchrun starts each rank with start_new_session=True, so killing
torchrun's process group alone would leave the ranks training). A kill freezes every tagged process with SIGSTOP
(so none moves on while the others die), then SIGKILLs them and waits, against a deadline, until none is left. All
waiting is by polling files and process state against deadlines; each attempt has a timeout; a failure names the
command, the seed and every kill so far, with the tail of each attempt's log.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TAG_ENV = "UNIDIFF_FAULT_TAG"
POLL_S = 0.002  # polling period of the watchers (a period, not a synchronisation)
VOLATILE = frozenset({"time", "tokens_per_s", "mfu"})  # wall-clock metrics: not expected to repeat
KINDS = ("startup", "step", "checkpoint", "latest")
WEIGHTS = (0.3, 0.3, 0.25, 0.15)


class HarnessError(AssertionError):
    pass


@dataclass
class Command:
    argv: list[str]
    run_dir: Path  # run.dir / run.name of this command
    cwd: Path
    env: dict[str, str]

    def shell(self) -> str:
        import shlex

        return " ".join(shlex.quote(a) for a in self.argv)


@dataclass
class Kill:
    attempt: int
    kind: str  # one of KINDS
    detail: str  # what fired it (delay, step, tmp dir and its file count, new latest)
    at_s: float  # seconds after the attempt started
    resumed_from: str  # what `latest` named when the attempt started ("" = nothing to resume)
    mid_write: str  # the unfinished .tmp_* checkpoint dir this attempt left, "" if none

    def __str__(self) -> str:
        where = f", left {self.mid_write}" if self.mid_write else ""
        return (f"attempt {self.attempt}: {self.kind} kill ({self.detail}) at {self.at_s:.2f}s, started from "
                f"{self.resumed_from or 'scratch'}{where}")


@dataclass
class Timings:
    first_step_s: float  # start -> first metrics record
    total_s: float
    run_dir: Path


@dataclass
class Report:
    command: str
    seed: int
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0
    completed_early: bool = False  # the command finished before the requested number of kills
    wall_s: float = 0.0
    logs: list[Path] = field(default_factory=list)

    def by_kind(self) -> dict[str, int]:
        return {k: sum(x.kind == k for x in self.kills) for k in KINDS}

    def mid_write(self) -> int:
        return sum(bool(k.mid_write) for k in self.kills)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in self.by_kind().items())
        return (f"{len(self.kills)} kills ({kinds}; {self.mid_write()} left a half-written checkpoint) over "
                f"{self.attempts} attempts in {self.wall_s:.1f}s, seed {self.seed}")

    def describe(self, log_tail: int = 1500) -> str:
        lines = [f"command: {self.command}", self.summary(), *map(str, self.kills)]
        for p in self.logs[-3:]:
            text = p.read_text(errors="replace") if p.exists() else ""
            lines += [f"--- tail of {p}", text[-log_tail:]]
        return "\n".join(lines)


# ---- processes ------------------------------------------------------------------------------------------------
def tagged_pids(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment carries TAG_ENV=tag."""
    needle = f"{TAG_ENV}={tag}".encode() + b"\0"
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read() + b"\0":
                    continue
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state not in (b"Z", b"X"):
            out.append(int(name))
    return out


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen, tag: str, deadline_s: float = 30.0) -> None:
    """Freeze (SIGSTOP) every tagged process until no new one appears, SIGKILL them all, reap `proc`, and wait until
    no tagged process is left."""
    try:
        os.killpg(proc.pid, signal.SIGSTOP)  # the command's own group first: the common case in one call
    except ProcessLookupError:
        pass
    frozen: set[int] = set()
    end = time.monotonic() + deadline_s
    while True:
        new = set(tagged_pids(tag)) - frozen
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        frozen |= new
        if time.monotonic() > end:
            raise HarnessError(f"processes tagged {tag} keep appearing: {sorted(frozen)}")
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _signal_all(frozen, signal.SIGKILL)
    proc.wait(timeout=max(1.0, end - time.monotonic()))
    wait_gone(tag, end - time.monotonic())


def wait_gone(tag: str, deadline_s: float) -> None:
    end = time.monotonic() + max(deadline_s, 1.0)
    while pids := tagged_pids(tag):
        _signal_all(pids, signal.SIGKILL)
        if time.monotonic() > end:
            raise HarnessError(f"processes tagged {tag} still alive after SIGKILL: {pids}")
        time.sleep(POLL_S)


def _start(cmd: Command, tag: str, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        return subprocess.Popen(cmd.argv, cwd=cmd.cwd, env={**cmd.env, TAG_ENV: tag}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


# ---- what a run leaves ----------------------------------------------------------------------------------------
def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _step_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1]) if name.startswith("step_") else 0


def _tmp_dirs(ckpt_root: Path) -> dict[tuple[int, int], Path]:
    """Unfinished checkpoint dirs by identity (inode, ctime): a dir re-created under the same name is a new one."""
    out = {}
    try:
        entries = list(os.scandir(ckpt_root))
    except OSError:
        return out
    for e in entries:
        if e.name.startswith(".tmp_step_"):
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            out[(st.st_ino, st.st_ctime_ns)] = Path(e.path)
    return out


def _count_files(d: Path) -> int:
    n = 0
    for _, _, files in os.walk(d):
        n += len(files)
    return n


class _MetricsTail:
    """The steps an attempt logs to metrics.jsonl (only what it appended: earlier attempts' lines are skipped)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.max_step = -1
        self._partial = b""

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return self.max_step
        self.offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                self.max_step = max(self.max_step, int(json.loads(line)["step"]))
        return self.max_step


def final_records(run_dir: Path) -> dict[int, dict]:
    """The last metrics record of every step (a killed attempt may have logged steps after its last checkpoint; the
    rerun logs them again)."""
    from training.tracking import read_metrics

    out: dict[int, dict] = {}
    for r in read_metrics(run_dir):
        out[int(r["step"])] = r
    return out


def compare_metrics(ref_dir: Path, got_dir: Path, steps: int, first: int = 0) -> list[str]:
    """Differences between the final per-step records of two runs: every step first..first+steps-1 must be there
    (the decoder stages log steps from 1), with every metric but the wall-clock ones exactly equal (loss, grad
    norm, per-task losses, lr, block size, router stats)."""
    ref, got = final_records(ref_dir), final_records(got_dir)
    problems = []
    for name, recs in (("uninterrupted", ref), ("killed", got)):
        if sorted(recs) != list(range(first, first + steps)):
            problems.append(f"{name} run logged steps {sorted(recs)}, want {first}..{first + steps - 1}")
    for s in sorted(set(ref) & set(got)):
        a, b = ({k: v for k, v in r.items() if k not in VOLATILE} for r in (ref[s], got[s]))
        diff = {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
        if diff:
            problems.append(f"step {s}: " + ", ".join(f"{k} {x!r} (uninterrupted) != {y!r}" for k, (x, y) in
                                                     diff.items()))
    return problems


def checkpoint_hashes(ckpt: Path) -> dict[str, str]:
    """sha256 of every file of a complete checkpoint, from its manifest."""
    files = json.loads((Path(ckpt) / "manifest.json").read_text())["files"]
    return {rel: info["sha256"] for rel, info in files.items()}


# ---- runs -----------------------------------------------------------------------------------------------------
def run_uninterrupted(cmd: Command, timeout_s: float) -> Timings:
    tag = uuid.uuid4().hex
    log = cmd.run_dir.with_name(cmd.run_dir.name + ".log")
    t0 = time.monotonic()
    proc = _start(cmd, tag, log)
    metrics = _MetricsTail(cmd.run_dir / "metrics.jsonl")
    first = None
    try:
        while proc.poll() is None:
            if first is None and metrics.poll() >= 0:
                first = time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise HarnessError(f"timed out after {timeout_s}s: {cmd.shell()}\n" + log.read_text()[-3000:])
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            kill_tree(proc, tag)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise HarnessError(f"exit {proc.returncode}: {cmd.shell()}\n" + log.read_text()[-3000:])
    wait_gone(tag, 30)
    return Timings(first_step_s=first if first is not None else total, total_s=total, run_dir=cmd.run_dir)


def _choose(rng: random.Random, latest_step: int, steps: int, save_every: int, t: Timings) -> tuple[str, float]:
    near_end = latest_step + save_every >= steps
    kind = "startup" if near_end else rng.choices(KINDS, WEIGHTS)[0]
    if kind == "startup":
        return kind, rng.uniform(0.0, t.first_step_s)
    if kind == "step":
        return kind, latest_step + rng.randint(0, max(0, min(3, steps - 2 - latest_step)))
    if kind == "checkpoint":
        return kind, rng.randint(0, 4)
    return kind, 0


def _watch(proc, kind: str, value: float, run_dir: Path, t0: float, deadline: float, stale: set) -> str | None:
    """Poll until the trigger fires (returns what fired it) or the process exits (returns None)."""
    root = run_dir / "checkpoints"
    latest0 = _read(root / "latest")
    metrics = _MetricsTail(run_dir / "metrics.jsonl")
    while proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError
        if kind == "startup":
            if now - t0 >= value:
                return f"{value:.2f}s after start"
            if metrics.poll() >= 0:
                return f"first step of the attempt (step {metrics.max_step}) before {value:.2f}s"
        if kind == "step" and metrics.poll() >= value:
            return f"step {metrics.max_step} logged"
        if kind == "checkpoint":
            for ident, d in _tmp_dirs(root).items():
                if ident not in stale and (n := _count_files(d)) >= value:
                    return f"{d.name} with {n} files (>= {value:g})"
        if kind in ("checkpoint", "latest") and (now_latest := _read(root / "latest")) != latest0:
            return f"latest -> {now_latest}" + (f" (missed the write, wanted >= {value:g} files)"
                                                if kind == "checkpoint" else "")
        time.sleep(POLL_S)
    return None


def run_with_kills(cmd: Command, *, seed: int, kills: int, steps: int, save_every: int, timings: Timings,
                   timeout_s: float, max_attempts: int | None = None) -> Report:
    """Kill `cmd` `kills` times at seeded moments, rerunning it after each kill, then let it finish."""
    rng = random.Random(seed)
    report = Report(command=cmd.shell(), seed=seed)
    print(f"fault harness: seed {seed}, {kills} kills, command: {report.command}", flush=True)
    root = cmd.run_dir / "checkpoints"
    t_start = time.monotonic()
    max_attempts = max_attempts or 3 * kills + 5
    while True:
        report.attempts += 1
        n = report.attempts
        if n > max_attempts:
            raise HarnessError(f"no completion after {max_attempts} attempts\n" + report.describe())
        want_kill = len(report.kills) < kills
        latest = _read(root / "latest")
        kind, value = _choose(rng, _step_of(latest), steps, save_every, timings) if want_kill else ("", 0)
        tag = uuid.uuid4().hex
        log = cmd.run_dir.with_name(f"{cmd.run_dir.name}.attempt{n:03d}.log")
        report.logs.append(log)
        stale = set(_tmp_dirs(root))
        t0 = time.monotonic()
        proc = _start(cmd, tag, log)
        try:
            fired = _watch(proc, kind, value, cmd.run_dir, t0, t0 + timeout_s, stale) if want_kill else None
            if fired is None and proc.poll() is None:
                proc.wait(timeout=max(1.0, t0 + timeout_s - time.monotonic()))
        except (TimeoutError, subprocess.TimeoutExpired):
            kill_tree(proc, tag)
            raise HarnessError(f"attempt {n} timed out after {timeout_s}s\n" + report.describe()) from None
        if fired is not None:
            at = time.monotonic() - t0
            kill_tree(proc, tag)
            left = [d.name for ident, d in _tmp_dirs(root).items() if ident not in stale]
            report.kills.append(Kill(n, kind, fired, at, latest, ",".join(left)))
            print(f"fault harness: {report.kills[-1]}", flush=True)
            continue
        wait_gone(tag, 30)  # e.g. ranks of torchrun still finalizing
        if proc.returncode != 0:
            raise HarnessError(f"attempt {n} exited {proc.returncode} without being killed\n" + report.describe())
        report.completed_early = want_kill
        break
    report.wall_s = time.monotonic() - t_start
    print(f"fault harness: {report.summary()}", flush=True)
    return report
