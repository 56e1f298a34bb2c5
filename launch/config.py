"""Config section `launch`: how many ranks where (local torchrun, SLURM), and the SLURM job's resources and
preemption behaviour. Command-line flags of `unidiff launch local|slurm` override these fields."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from training.config_errors import ConfigError

# launch.env names that hold secrets (WANDB_API_KEY, HF_TOKEN, ...): their values go to the ranks through the
# environment only, and every saved or logged config shows REDACTED instead (training/config.py: redacted).
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSW(OR)?D|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    return _SECRET.search(name) is not None


def redact_override(word: str) -> str:
    """A command-line word as it may be shown or passed on: `launch.env.SECRET=v` -> `launch.env.SECRET=<redacted>`."""
    key, eq, _ = word.partition("=")
    if eq and key.startswith("launch.env.") and is_secret(key[len("launch.env."):]):
        return f"{key}={REDACTED}"
    return word


# sbatch --time accepts: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(text: str) -> int | None:
    """Seconds in an sbatch --time value, or None when it is not one (empty = the partition's default)."""
    m = _TIME.match(text.strip())
    if not m:
        return None
    d, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if d is not None:  # D-HH[:MM[:SS]]
        return d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # MM


@dataclass
class LaunchConfig:
    nodes: int = 1  # nodes of a SLURM job (`launch local` is always one node)
    nproc: int = 0  # ranks per node; 0 = one per GPU (gpus_per_node, or the visible GPUs locally), 1 without GPUs
    gpus_per_node: int = 0  # GPUs requested per node (sbatch --gpus-per-node); 0 = CPU-only job (gloo)
    cpus_per_task: int = 0  # CPU cores per rank (sbatch/srun --cpus-per-task); 0 = the cluster's default
    mem: str = ""  # memory per node (sbatch --mem, e.g. 500G); empty = the cluster's default
    time: str = ""  # wall-clock limit (sbatch --time: [D-]HH:MM:SS or minutes); empty = the partition's default
    partition: str = ""  # sbatch --partition; empty = the cluster's default partition
    account: str = ""  # sbatch --account
    qos: str = ""  # sbatch --qos
    constraint: str = ""  # sbatch --constraint (node features, e.g. h100)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of every rank (NCCL_*, GLOO_SOCKET_IFNAME)
    signal_lead_s: int = 300  # seconds before the time limit when SLURM sends USR1: one step + one checkpoint
    # save must fit in it (SLURM may deliver it up to 60 s early)
    requeue: bool = True  # after a pre-timeout save, requeue the job so it resumes from `latest`
    max_requeues: int = 20  # stop requeueing once SLURM_RESTART_COUNT reaches this (guards against a crash loop)
    master_port: int = 0  # rank-0 TCP port on the first node; 0 = a port the head node's kernel reports free
    job_name: str = ""  # sbatch --job-name; empty = run.name
    # What one GPU offers, for `unidiff plan` (configs/launch/h100.yaml, h200.yaml); peak FLOP/s is train.peak_flops.
    gpu_memory_bytes: int = 80 * 2**30  # device memory per GPU (H100 SXM 80 GiB)
    gpu_memory_reserve_bytes: int = 4 * 2**30  # kept out of the plan's budget: CUDA context, NCCL buffers,
    # allocator fragmentation (what fake tensors cannot see)
    intra_node_bytes_per_s: float = 450e9  # per-GPU NVLink bandwidth, one direction (H100/H200 NVLink 4: 450 GB/s)
    inter_node_bytes_per_s: float = 50e9  # per-GPU network bandwidth (one 400 Gb/s InfiniBand NIC per GPU)
    shards_per_task: int = 1  # `launch slurm --array` (pretokenize): raw shards per array task
    max_parallel_tasks: int = 0  # `--array`: array tasks running at once (sbatch --array=...%N); 0 = no limit

    def validate(self, root) -> None:
        def need(ok: bool, key: str, value, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"launch.{key}={value} is not allowed: must be {allowed}")

        need(self.nodes >= 1, "nodes", self.nodes, ">= 1")
        for key in ("nproc", "gpus_per_node", "cpus_per_task", "max_requeues", "max_parallel_tasks"):
            need(getattr(self, key) >= 0, key, getattr(self, key), ">= 0")
        need(self.shards_per_task >= 1, "shards_per_task", self.shards_per_task, ">= 1")
        need(self.gpus_per_node == 0 or self.nproc in (0, self.gpus_per_node), "nproc", self.nproc,
             f"0 or launch.gpus_per_node={self.gpus_per_node} (one rank per GPU; fewer ranks would leave GPUs idle)")
        need(0 <= self.signal_lead_s <= 65535, "signal_lead_s", self.signal_lead_s, "in [0, 65535] seconds")
        need(self.master_port == 0 or 1024 <= self.master_port <= 65535, "master_port", self.master_port,
             "0 (a free port, found at job start) or a port in [1024, 65535]")
        if self.time:
            limit = time_limit_seconds(self.time)
            need(limit is not None, "time", self.time, "an sbatch time: MM, HH:MM:SS or D-HH:MM:SS")
            need(self.signal_lead_s < limit, "signal_lead_s", self.signal_lead_s,
                 f"shorter than launch.time={self.time} ({limit} s)")
        for k in self.env:
            need(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) is not None, f"env.{k}", self.env[k],
                 "keyed by a shell variable name")
        need(self.gpu_memory_bytes > 0, "gpu_memory_bytes", self.gpu_memory_bytes, "> 0")
        need(self.intra_node_bytes_per_s > 0 and self.inter_node_bytes_per_s > 0, "intra_node_bytes_per_s",
             self.intra_node_bytes_per_s, "> 0 (and inter_node_bytes_per_s too)")
        need(re.fullmatch(r"[\w.-]*", self.job_name) is not None, "job_name", self.job_name,
             "letters, digits, '.', '-' and '_'")

    def public_env(self) -> dict[str, str]:
        """launch.env as it may be written or logged: secret values replaced by REDACTED."""
        return {k: REDACTED if is_secret(k) else v for k, v in self.env.items()}

    def env_to_set(self) -> dict[str, str]:
        """launch.env entries to set in the ranks' environment: all but the REDACTED placeholders that a saved
        config holds for its secrets (the environment's own value stands there)."""
        return {k: str(v) for k, v in self.env.items() if not (is_secret(k) and v == REDACTED)}

    def secrets(self) -> dict[str, str]:
        """The secret entries with their values, for the environment of a launcher's child process."""
        return {k: v for k, v in self.env_to_set().items() if is_secret(k)}

    def ranks_per_node(self, visible_gpus: int = 0) -> int:
        """nproc, with 0 resolved: one per requested (SLURM) or visible (local) GPU, else 1."""
        return self.nproc or self.gpus_per_node or visible_gpus or 1
