"""kill -9 at any moment, rerun the same command: the per-step metrics equal an uninterrupted run's, exactly.

Each test runs one configuration through tests/fault_harness.py: an uninterrupted run, then the same command killed
(SIGKILL of every process it started) at seeded random moments - during start-up, between steps, inside checkpoint
writes, right after `latest` moved - and rerun until it completes. Every step's final metrics record (loss, grad
norm, per-task losses, lr, router statistics; not the wall-clock ones) must equal the uninterrupted run's, and so
must the final checkpoint, file by file. UNIDIFF_FAULT_KILLS / UNIDIFF_FAULT_SEED scale a longer run (docs/faults.md).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fault_harness import (Command, checkpoint_hashes, compare_metrics, final_records, run_uninterrupted,
                                 run_with_kills)

pytestmark = pytest.mark.faults

TINY = ROOT / "configs/model/tiny.yaml"
KILLS = int(os.environ.get("UNIDIFF_FAULT_KILLS", "0"))  # 0: each test's CI default
SEED = os.environ.get("UNIDIFF_FAULT_SEED")
TRAIN = ["train.seq_len=64", "train.warmup_steps=2", "train.decay_steps=3", "train.save_every=2",
         "train.keep_last=2", "train.micro_batch_size=2", "train.global_batch_size=4", "train.precision=fp32",
         "diffusion.block_schedule=[[0,16],[4,0]]", "tracking.wandb=disabled"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _train_argv(launcher: list[str], words: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "launch.cli", *launcher, str(TINY), *words, f"run.dir={run_dir.parent}",
            f"run.name={run_dir.name}"]


def _scaled(default_kills: int, default_steps: int) -> tuple[int, int]:
    """CI figures, or UNIDIFF_FAULT_KILLS kills over 1.4 steps per kill (a kill advances the run by ~0.6 steps)."""
    kills = KILLS or default_kills
    return kills, max(default_steps, int(kills * 1.4) // 2 * 2)


def _kill_and_compare(tmp_path, launcher, words, *, seed, kills, steps, timeout_s, min_mid_write=0):
    words = [*words, f"train.steps={steps}"]
    ref = Command(_train_argv(launcher, words, tmp_path / "whole"), tmp_path / "whole", ROOT, _env())
    got = Command(_train_argv(launcher, words, tmp_path / "killed"), tmp_path / "killed", ROOT, _env())
    seed = int(SEED) if SEED else seed
    timings = run_uninterrupted(ref, timeout_s=timeout_s)
    report = run_with_kills(got, seed=seed, kills=kills, steps=steps, save_every=2, timings=timings,
                            timeout_s=timeout_s)
    return _assert_reproduced(ref, got, report, kills, steps, min_mid_write=min_mid_write)


def _assert_reproduced(ref, got, report, kills: int, steps: int, first: int = 0, min_mid_write: int = 0):
    """The killed-and-rerun command left what the uninterrupted one did: every step's metrics (logged from step
    `first`) and the final checkpoint, file by file."""
    why = report.describe()
    assert not report.completed_early and len(report.kills) >= kills, why
    assert report.mid_write() >= min_mid_write, why  # the harness really hit checkpoint writes
    problems = compare_metrics(ref.run_dir, got.run_dir, steps, first=first)
    assert not problems, "\n".join(problems[:20]) + "\n" + why
    final = f"checkpoints/step_{steps:06d}"
    assert checkpoint_hashes(got.run_dir / final) == checkpoint_hashes(ref.run_dir / final), why
    return report


def test_single_process_synthetic_survives_kills_at_any_moment(tmp_path):
    kills, steps = _scaled(10, 14)
    _kill_and_compare(tmp_path, ["train"], ["data.synthetic=true", *TRAIN], seed=1301, kills=kills, steps=steps,
                      timeout_s=120, min_mid_write=1)


def test_two_ranks_expert_parallel_survive_kills_of_the_whole_job(tmp_path):
    """torchrun starts each rank in a session of its own: the harness kills torchrun and the ranks together."""
    kills, steps = _scaled(3, 10)
    _kill_and_compare(tmp_path, ["launch", "local", "--nproc", "2"],
                      ["data.synthetic=true", "parallel.expert=2", *TRAIN], seed=2602, kills=kills, steps=steps,
                      timeout_s=180)


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    """make-sample -> fit-codebook -> pretokenize on the small sample of the data tests (about 6 s)."""
    from data_pipeline.image_tokenizer.fit_codebook import fit_codebook
    from data_pipeline.pretokenize import pretokenize
    from data_pipeline.sample import make_sample
    from tests.test_data_pipeline import small_cfg

    d = small_cfg(tmp_path_factory.mktemp("data"))
    make_sample(d.raw_dir, d.sample, progress=False)
    fit_codebook(d, progress=False)
    pretokenize(d, progress=False)
    return d


def test_single_process_on_token_shards_survives_kills(tmp_path, token_dir):
    """Real token shards, two sources mixed by weight, 2 micro-batches per step; the small val split packs into 8
    steps per epoch, so the run (and its kills) crosses epoch boundaries."""
    kills, steps = _scaled(4, 10)
    words = [f"data.raw_dir={token_dir.raw_dir}", f"data.token_dir={token_dir.token_dir}", "data.split=val",
             "data.datasets.interleaved=1.0", "data.datasets.vqa=2.0",
             *[w for w in TRAIN if not w.startswith("train.seq_len")], "train.seq_len=128"]
    _kill_and_compare(tmp_path, ["train"], words, seed=3903, kills=kills, steps=steps, timeout_s=120)
    from training.state_file import read_state

    extra = read_state(tmp_path / f"killed/checkpoints/step_{steps:06d}/extra/rank00000")
    assert extra["loader"]["0"]["epoch"] >= 1, extra["loader"]  # the run did cross an epoch boundary


# ---- a signal before the trainer starts ------------------------------------------------------------------------
def _caught(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    return 0


def _has_torch(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def test_usr1_during_startup_imports_saves_after_one_step_and_the_rerun_resumes(tmp_path):
    """SLURM's pre-timeout USR1 can come while `unidiff train` is still importing torch: USR1's default action
    would kill the rank. The handler is installed before the heavy imports and the trainer takes the signal over."""
    words = ["data.synthetic=true", *TRAIN, "train.steps=4"]
    argv = _train_argv(["train"], words, tmp_path / "sig")
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _caught(proc.pid) & (1 << (signal.SIGUSR1 - 1)):  # poll: the handler is in place
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.0005)
        torch_loaded = _has_torch(proc.pid)  # read after SigCgt: torch absent here => handler came first
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not torch_loaded, "the USR1 handler was installed only after torch was imported"
    assert proc.returncode == 0, out
    assert f"stopping at step 1 (signal {int(signal.SIGUSR1)}); checkpoint saved" in out, out
    assert sorted(final_records(tmp_path / "sig")) == [0]  # at most one step trained
    assert (tmp_path / "sig/checkpoints/latest").read_text().strip() == "step_000001"
    r = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "at step 1" in r.stderr, r.stderr
    ref = subprocess.run(_train_argv(["train"], words, tmp_path / "whole"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    problems = compare_metrics(tmp_path / "whole", tmp_path / "sig", 4)
    assert not problems, "\n".join(problems)


# ---- the decoder stages: train-decoder and distill ---------------------------------------------------------------
DECODER_CFG = ROOT / "configs/decoder/toy.yaml"
DECODER = ["decoder.image_size=16", "decoder.token_grid=2", "decoder.patch_size=4", "decoder.dim=32",
           "decoder.n_heads=2", "decoder.axes_dims=[4,6,6]", "decoder.n_layers=1", "decoder.cap_feat_dim=16",
           "decoder.t_mid_dim=32", "decoder.codebook_size=10", "decoder.batch_size=4", "decoder.warmup_steps=2",
           "decoder.save_every=2", "decoder.keep_last=2", "decoder.log_every=1", "tracking.wandb=disabled"]


def _stage_kill_and_compare(tmp_path, stage: str, words: list[str], *, out: str, seed: int, kills: int, steps: int,
                            timeout_s: float):
    """`unidiff STAGE` killed at seeded moments and rerun == uninterrupted: per-step metrics (logged from step 1)
    and the final checkpoint (weights, EMA, optimizer, RNG state), file by file."""
    def command(name):
        argv = [sys.executable, "-m", "launch.cli", stage, str(DECODER_CFG), *words, f"run.dir={tmp_path}",
                f"run.name={name}"]
        return Command(argv, tmp_path / name / out, ROOT, _env())

    ref, got = command("whole"), command("killed")
    seed = int(SEED) if SEED else seed
    report = run_with_kills(got, seed=seed, kills=kills, steps=steps, save_every=2,
                            timings=run_uninterrupted(ref, timeout_s=timeout_s), timeout_s=timeout_s)
    return _assert_reproduced(ref, got, report, kills, steps, first=1)


def test_train_decoder_survives_kills(tmp_path):
    kills, steps = _scaled(10, 14)
    _stage_kill_and_compare(tmp_path, "train-decoder", [*DECODER, f"decoder.train_steps={steps}"], out="decoder",
                            seed=4407, kills=kills, steps=steps, timeout_s=120)


@pytest.mark.parametrize("method", ["trajectory_distillation", "consistency_training"])
def test_distill_survives_kills(tmp_path, method):
    """The student's stage: the trajectory pool is rebuilt the same way on every rerun (seeded), the consistency
    method continues the data order; both from one teacher trained once."""
    teacher = tmp_path / "teacher"
    from training.config import load_config
    from training.decoder.train import train_decoder
    train_decoder(load_config(DECODER_CFG, [*DECODER, "decoder.train_steps=2", f"run.dir={tmp_path}",
                                            "run.name=teacher"]), progress=False)
    kills, steps = _scaled(10, 14) if method == "trajectory_distillation" else _scaled(4, 10)
    words = [*DECODER, f"distill.teacher={teacher / 'decoder' / 'checkpoints'}", f"distill.method={method}",
             "distill.steps=2", "distill.batch_size=4", "distill.pool_size=8", f"distill.train_steps={steps}",
             "distill.save_every=2", "distill.keep_last=2", "distill.log_every=1"]
    _stage_kill_and_compare(tmp_path, "distill", words, out="distill", seed=5501, kills=kills, steps=steps,
                            timeout_s=120)
