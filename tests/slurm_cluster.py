"""A throw-away real SLURM cluster on this machine: one munged, one slurmctld and two slurmd (emulated nodes n1, n2).

Everything lives in one private directory (its own munge key and socket, slurm.conf, state, spool, logs) and every
daemon listens on ports reserved at start outside the kernel's ephemeral range (`reserve_ports`), so a cluster
started by one test session never meets another's, a system SLURM or a concurrent test's port-0 bind. The daemons
are stopped one by one by the pids they wrote, never by name.

Debian's slurm-wlm + munge are installed with apt-get when missing (needs root, as on CI). Measured facts behind the
settings are in shared/research/cpu-slurm-wandb-webdataset.md section 1:
- Debian's build has --enable-multiple-slurmd: `slurmd -N n1` and `slurmd -N n2` on one host, each with its own port.
- n1/n2 do not resolve as host names; NodeAddr=127.0.0.1 and jobs read the address from `scontrol show node`.
- `AuthInfo=cred_expire=` also sets how long a requeued job waits before it may start again (default 120 s);
  10 s keeps the preemption test short without racing step credentials.
- MULTIPLE_SLURMD nodes share the host's CPUs: each node advertises all of them (jobs here use 1 CPU per task).

Use as a pytest fixture (`slurm_cluster`, session scope) or by hand:
    python tests/slurm_cluster.py up DIR   ->  prints `export SLURM_CONF=...`;   python tests/slurm_cluster.py down DIR
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.ports import reserve_ports

SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
APT_PACKAGES = ("slurm-wlm", "munge")


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)


def ensure_installed() -> str | None:
    """Install slurm-wlm and munge with apt-get when missing. Returns None when ready, else why it cannot run."""
    if sys.platform != "linux":
        return f"SLURM tests need Linux (this is {sys.platform})"
    missing = [n for n in NEEDED if _which(n) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return (f"SLURM is not installed (missing {', '.join(missing)}) and installing it needs root: "
                f"run `apt-get install {' '.join(APT_PACKAGES)}` or run the tests as root")
    if _which("apt-get") is None:
        return f"SLURM is not installed (missing {', '.join(missing)}) and there is no apt-get to install it"
    # One installer at a time (pytest-xdist workers, a second test session).
    with open("/tmp/unidiff-slurm-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(_which(n) for n in NEEDED):
            return None
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SBIN_PATH}
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                return f"`{' '.join(cmd)}` failed (rc={r.returncode}): {' | '.join(tail)}"
    missing = [n for n in NEEDED if _which(n) is None]
    return f"apt-get installed {APT_PACKAGES} but {missing} are still missing" if missing else None


class SlurmCluster:
    """slurmctld + `nodes` slurmd on loopback, configured under `base`. Client commands need `self.env`."""

    def __init__(self, base: Path, nodes: int = 2, cred_expire_s: int = 10):
        self.base = Path(base).resolve()
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cred_expire_s = cred_expire_s
        self.conf = self.base / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": os.environ.get("PATH", "") + ":" + SBIN_PATH}
        self._pidfiles: list[Path] = []

    @classmethod
    def attach(cls, base: Path) -> "SlurmCluster":
        """A handle on a cluster started earlier under `base` (by another process), for clients and stop()."""
        c = cls(base)
        run = c.base / "run"
        c._pidfiles = [c.base / "munge/munged.pid", run / "slurmctld.pid", *sorted(run.glob("slurmd-*.pid"))]
        return c

    def running(self) -> bool:
        try:
            return _alive(int((self.base / "run/slurmctld.pid").read_text().strip()))
        except (OSError, ValueError):
            return False

    # ---------------------------------------------------------------- start / stop
    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        for d in ("munge", "state", "log", "run", *(f"spool-{n}" for n in self.nodes)):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            ctld_port, *node_ports = reserve_ports(1 + len(self.nodes))
            self.conf.write_text(self._slurm_conf(ctld_port, node_ports))
            self._daemon(["slurmctld", "-f", str(self.conf)], self.base / "run/slurmctld.pid")
            for n in self.nodes:
                self._daemon(["slurmd", "-N", n, "-f", str(self.conf)], self.base / f"run/slurmd-{n}.pid")
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key = self.base / "munge/munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        (self.base / "munge").chmod(0o755)  # munged wants clients to be able to reach the socket's dir
        d = self.base / "munge"
        self._daemon(["munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                      f"--seed-file={d / 'munged.seed'}"], d / "munged.pid")

    def _daemon(self, cmd: list[str], pidfile: Path, wait_s: float = 15) -> None:
        """Run a self-daemonizing SLURM/munge daemon and wait for its pid file."""
        self._pidfiles.append(pidfile)
        r = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        t0 = time.time()
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if time.time() - t0 > wait_s:
                raise RuntimeError(f"{cmd[0]} wrote no pid file {pidfile} within {wait_s} s\n{self.logs()}")
            time.sleep(0.1)

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        b = self.base
        ncpu = os.cpu_count() or 1
        mem_mb = max(512, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8 / len(self.nodes)))
        host = socket.gethostname().split(".")[0]
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={ncpu} "
                          f"RealMemory={mem_mb} State=UNKNOWN" for n, p in zip(self.nodes, node_ports))
        return f"""# Written by tests/slurm_cluster.py: throw-away cluster on loopback, {len(self.nodes)} emulated nodes.
ClusterName=unidiff-ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
# cred_expire is also the wait before a requeued job may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmdSpoolDir={b}/spool-%n
StateSaveLocation={b}/state
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SwitchType=switch/none
SchedulerType=sched/backfill
# schedule every few seconds (defaults 60 s / 30 s) so a requeued job starts as soon as it may
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={b}/log/jobcomp.txt
JobRequeue=1
InactiveLimit=0
KillWait=10
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _wait_idle(self, timeout_s: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes {self.nodes} not idle after {timeout_s} s\n{self.logs()}")

    def stop(self) -> None:
        """Cancel what is left, then stop every daemon this cluster started, by pid, newest first."""
        if self.conf.exists() and (self.base / "run/slurmctld.pid").exists():
            self.run("scancel", "--full", "--quiet", "--user", str(os.getuid()), check=False, timeout=10)
            t0 = time.time()
            while time.time() - t0 < 15 and self.run("squeue", "-h", check=False, timeout=10).stdout.strip():
                time.sleep(0.3)
        for pidfile in reversed(self._pidfiles):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            t0 = time.time()
            while time.time() - t0 < 10 and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._pidfiles.clear()

    # ---------------------------------------------------------------- clients
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc={r.returncode}): {r.stderr.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout.splitlines()[0]))

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout_s: float = 300) -> dict[str, str]:
        t0 = time.time()
        info: dict[str, str] = {}
        while time.time() - t0 < timeout_s:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout_s} s (last: {info.get('JobState')})\n"
                           f"{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*.log")) + [self.base / "munge/munged.log"]:
            if f.exists():
                tail = f.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)


class SharedCluster:
    """One cluster for every pytest-xdist worker of a test run (the workers' basetemps share a parent): the first
    user starts it, later users attach, the last one to leave stops it. Reference count under a file lock."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.base = self.root / "cluster"
        self.state = self.root / "users.json"
        self.cluster: SlurmCluster | None = None

    def _locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / "lock", "w")
        fcntl.flock(f, fcntl.LOCK_EX)
        return f

    def __enter__(self) -> SlurmCluster:
        with self._locked():
            users = json.loads(self.state.read_text())["users"] if self.state.exists() else 0
            cluster = SlurmCluster.attach(self.base)
            if users == 0 or not cluster.running():
                shutil.rmtree(self.base, ignore_errors=True)
                cluster = SlurmCluster(self.base).start()
                users = 0
            self.state.write_text(json.dumps({"users": users + 1}))
        self.cluster = cluster
        return cluster

    def __exit__(self, *exc) -> None:
        with self._locked():
            users = json.loads(self.state.read_text())["users"] - 1
            self.state.write_text(json.dumps({"users": users}))
            if users <= 0:
                self.cluster.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited (PID 1 here reaps late)
    except OSError:
        return False


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    base = Path(argv[1]).resolve()
    if argv[0] == "up":
        cluster = SlurmCluster(base)
        reason = ensure_installed()
        if reason:
            print(reason, file=sys.stderr)
            return 1
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    SlurmCluster.attach(base).stop()
    return 0


try:  # the fixture, when imported by a test module (pytest is not needed for the command line above)
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster(tmp_path_factory):
        reason = ensure_installed()
        if reason:
            pytest.skip(reason)
        root = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            root = root.parent  # shared by the workers of this run: one cluster, whichever workers need it
        with SharedCluster(root / "slurm") as cluster:
            yield cluster
except ImportError:  # pragma: no cover
    pass

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
