"""Secrets in `launch.env` (API keys, tokens, passwords) reach the ranks through the environment only: never a saved
config, the wandb config, a rendered sbatch script, a rank's command line or the launcher's log."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from training.config import load_config, save_config

TINY = ROOT / "configs/model/tiny.yaml"
KEY, TOKEN = "wandb-key-7f3a91c2e5", "svc-token-0d4b8e6f19"  # distinct strings, searched for in every file


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _preset(tmp_path: Path) -> Path:
    """A user's preset holding one secret (the other comes as a command-line override), outside the run dir."""
    p = tmp_path / "mine.yaml"
    p.write_text(f"defaults: [{TINY}]\nlaunch:\n  env:\n    WANDB_API_KEY: {KEY}\n    NCCL_DEBUG: WARN\n")
    return p


def _files_holding(root: Path, *needles: str) -> list[str]:
    hits = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        data = f.read_bytes()
        hits += [f"{f.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.unit
def test_saved_config_and_wandb_config_hold_no_secret(tmp_path):
    from training.config import to_dict
    from training.tracking import Tracker

    cfg = load_config(_preset(tmp_path), [f"run.dir={tmp_path / 'runs'}", "run.name=r",
                                          f"launch.env.MY_SERVICE_TOKEN={TOKEN}", "tracking.wandb=offline"])
    assert cfg.launch.env["WANDB_API_KEY"] == KEY  # the live config keeps the value for the launcher
    save_config(cfg, cfg.run_dir / "config.yaml")
    logged = to_dict(cfg)
    assert logged["launch"]["env"]["NCCL_DEBUG"] == "WARN"  # only the secret-looking names are redacted
    assert KEY not in json.dumps(logged) and TOKEN not in json.dumps(logged)
    tracker = Tracker(cfg, cfg.run_dir)
    tracker.log(0, {"loss": 1.0}, console=False)
    tracker.close()
    assert list(cfg.run_dir.glob("wandb/*run-*")), "no offline wandb run was written"
    assert _files_holding(cfg.run_dir, KEY, TOKEN) == []
    # A saved config loads back; its placeholders never replace a value the environment provides.
    again = load_config(cfg.run_dir / "config.yaml")
    assert again.launch.env["NCCL_DEBUG"] == "WARN" and "MY_SERVICE_TOKEN" not in again.launch.env_to_set()


@pytest.mark.unit
def test_sbatch_script_exports_the_name_and_sbatch_gets_the_value(tmp_path, monkeypatch):
    from tests.test_slurm import launch_args
    from launch.slurm import launch_slurm

    bin_dir, probe = tmp_path / "bin", tmp_path / "probe.json"
    bin_dir.mkdir()
    # A stand-in sbatch (a real child process): records what its environment holds, as hashes, and "submits".
    (bin_dir / "sbatch").write_text(f"""#!{sys.executable}
import hashlib, json, os, sys
h = lambda k: hashlib.sha256(os.environ.get(k, "").encode()).hexdigest()
json.dump({{"WANDB_API_KEY": h("WANDB_API_KEY"), "MY_SERVICE_TOKEN": h("MY_SERVICE_TOKEN"), "argv": sys.argv}},
          open({str(probe)!r}, "w"))
print("4242")
""")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cfg = load_config(_preset(tmp_path), [f"run.dir={tmp_path / 'runs'}", "run.name=r"])
    args = launch_args(words=[str(_preset(tmp_path)), f"launch.env.MY_SERVICE_TOKEN={TOKEN}"],
                       env=[f"MY_SERVICE_TOKEN={TOKEN}"])
    assert launch_slurm(cfg, args) == ["4242"]
    seen = json.loads(probe.read_text())
    assert seen["WANDB_API_KEY"] == _sha(KEY) and seen["MY_SERVICE_TOKEN"] == _sha(TOKEN)
    slurm_dir = cfg.run_dir / "slurm"
    script = (slurm_dir / "train.sbatch").read_text()
    assert "export WANDB_API_KEY\n" in script and "export MY_SERVICE_TOKEN\n" in script and \
        "export NCCL_DEBUG=WARN" in script
    assert _files_holding(cfg.run_dir, KEY, TOKEN) == []
    # The job fails at once, naming the variable, where the submitting environment lacks it.
    env_block = script.split("# ---- environment of every rank", 1)[1].split("\n", 1)[1].split("# ---- rendezvous")[0]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "MY_SERVICE_TOKEN")}
    r = subprocess.run(["bash", "-uc", env_block], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "launch.env.MY_SERVICE_TOKEN is a secret" in r.stderr, r.stderr


@pytest.mark.dist
def test_local_launch_passes_secrets_through_the_environment_only(tmp_path):
    """A real `unidiff launch local` training run: the rank sees both values, no file of the run holds them."""
    site, probe = tmp_path / "site", tmp_path / "probe"
    site.mkdir()
    probe.mkdir()
    # Imported at start-up by every Python process of the launch: each rank records hashes of what it was given.
    (site / "sitecustomize.py").write_text(f"""import hashlib, json, os
if "RANK" in os.environ:
    h = lambda k: hashlib.sha256(os.environ.get(k, "").encode()).hexdigest()
    with open(os.path.join({str(probe)!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
        json.dump({{"WANDB_API_KEY": h("WANDB_API_KEY"), "MY_SERVICE_TOKEN": h("MY_SERVICE_TOKEN")}}, f)
""")
    run_root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "MY_SERVICE_TOKEN")}
    env.update(PYTHONPATH=str(site), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "launch.cli", "launch", "local", str(_preset(tmp_path)),
                        f"launch.env.MY_SERVICE_TOKEN={TOKEN}", f"run.dir={run_root}", "run.name=sec",
                        "data.synthetic=true", "train.steps=2", "train.seq_len=32", "train.micro_batch_size=1",
                        "train.global_batch_size=1", "train.precision=fp32", "train.warmup_steps=1",
                        "train.decay_steps=1", "tracking.wandb=offline", "--nproc", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads((probe / "rank0.json").read_text())
    assert seen == {"WANDB_API_KEY": _sha(KEY), "MY_SERVICE_TOKEN": _sha(TOKEN)}
    run_dir = run_root / "sec"
    assert (run_dir / "config.yaml").exists() and list(run_dir.glob("wandb/*run-*"))
    assert _files_holding(run_dir, KEY, TOKEN) == []
    assert KEY not in r.stdout + r.stderr and TOKEN not in r.stdout + r.stderr  # nor the launcher's log
