"""One-shot GPU check: run it once when a GPU (one H100 / H200) is lent. Budgeted to 8 minutes: past --budget
(450 s) it writes what finished, marks the rest failed and exits, so a hung kernel cannot eat the whole loan.

The CPU test suite cannot see the CUDA path: bf16 autocast, the compiled FlexAttention forward *and backward*,
the CUTLASS `torch._grouped_mm` expert kernel, NCCL, and real throughput. This script exercises exactly those,
each check a function returning {"name", "ok", ...figures}; a failing check records its exception and never stops
the others. One line per check is printed, then a summary line; the exit code is non-zero if any check failed.

    1. unit subset on the device
       model_fwd_bwd   tiny LLaDA2-MoE forward + backward under bf16 autocast (fp32 with --cpu), block-diffusion
                       mask on the path model.attention=auto picks (flex on CUDA, dense SDPA on CPU): finite loss
                       and grads; also records the dtype the router computes in under autocast
       flex_vs_dense   `attend` with the FlexAttention BlockMask vs dense SDPA with the boolean mask (block
                       diffusion and MDLM): max abs diff of outputs and of q/k/v grads. With --cpu forward only:
                       torch has no FlexAttention backward on CPU (see training/diffusion/masks.py `use_flex`)
       grouped_mm      Experts with grouped_gemm=auto (`torch._grouped_mm`) vs off (per-expert loop), forward +
                       backward, bf16 on CUDA with a bf16 tolerance; records whether "auto" really called
                       torch._grouped_mm and the output dtype of both paths under autocast (autocast does not
                       cover _grouped_mm: the model has to cast for it)
    2. train_<engine>  `unidiff launch local --nproc 1` (torchrun, world size 1) of the tiny config for native,
                       megatron, deepspeed: a run stopped with train.stop_after=K, then resumed by the same
                       command, against an uninterrupted `unidiff train`; per-step loss and grad norm in
                       metrics.jsonl must be bit-identical, before the stop (determinism) and after the resume
                       (the engines run concurrently, each subprocess under a timeout)
    3. throughput      llada2_mini cut to 3 layers (first dense), full width / 256 experts / vocab 173568,
                       seq_len 4096, micro batch 1, bf16, flex attention, block diffusion through
                       training.diffusion.diffusion_loss as the trainer calls it, plus AdamW: tokens/s, FLOP/s by
                       training.trainer.flops_per_token (the trainer's formula), MFU against the GPU's peak bf16
                       FLOP/s, CUDA peak memory. With --cpu: tiny.yaml at seq_len 128 against a nominal peak.

    make gpu-check                               # on the GPU machine -> bench/results/gpu_check.json
    python bench/gpu_check.py --cpu [--out F]    # the same checks at toy size on CPU (tests/test_gpu_check.py)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "configs/model/tiny.yaml"
MINI = ROOT / "configs/model/llada2_mini.yaml"
ENGINES = ("native", "megatron", "deepspeed")
ORDER = ["model_fwd_bwd", "flex_vs_dense", "grouped_mm", *(f"train_{e}" for e in ENGINES), "throughput"]
PEAK_BF16 = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H200": 989e12}  # dense bf16 FLOP/s per GPU
NOMINAL_CPU_PEAK = 1e11  # --cpu only: a made-up figure so the MFU code path runs; flagged peak_is_nominal

import torch  # noqa: E402

from bench.gpu_kernels import _all_finite, check_flex_vs_dense, check_grouped_mm, check_model_fwd_bwd  # noqa: E402


def _peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


# ---- 2. unidiff train through `launch local`, stop + resume ------------------------------------------------------
def _train_words(run_dir: Path, name: str, engine: str, cuda: bool, steps: int, extra=(), launch=True) -> list[str]:
    """`unidiff launch local CONFIG --nproc 1 ...` (or plain `unidiff train CONFIG ...`) with the overrides of
    tests/test_trainer.py: synthetic data, 64 tokens, a block-size switch after the stop point."""
    cmd = ["launch", "local", str(TINY), "--nproc", "1"] if launch else ["train", str(TINY)]
    return [sys.executable, "-m", "launch.cli", *cmd,
            "data.synthetic=true", "train.seq_len=64", f"train.steps={steps}", "train.warmup_steps=2",
            "train.decay_steps=3", "train.save_every=0", "train.micro_batch_size=2", "train.global_batch_size=4",
            f"train.precision={'bf16' if cuda else 'fp32'}", "diffusion.block_schedule=[[0,16],[4,0]]",
            "tracking.wandb=disabled", f"train.engine={engine}", f"run.dir={run_dir}", f"run.name={name}", *extra]


def _sub_env(cuda: bool) -> tuple[dict, list[str]]:
    env, notes = dict(os.environ), []
    env.setdefault("WANDB_MODE", "offline")
    per_rank = str(max(1, (os.cpu_count() or 1) // 6))  # up to 6 ranks run at once
    env.setdefault("OMP_NUM_THREADS", per_rank)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", per_rank)
    if cuda and env.get("DS_ACCELERATOR") == "cpu":  # the Makefile exports DS_ACCELERATOR=cpu for CPU machines
        env["DS_ACCELERATOR"] = "cuda"
        notes.append("DS_ACCELERATOR=cpu was set in the environment (Makefile); the ranks got DS_ACCELERATOR=cuda")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env, notes


_CHILDREN: set = set()  # live subprocesses, each the leader of its own process group (launcher, torchrun, rank)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(words: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    """Run to completion or kill the whole process group (torchrun and its rank too) after `timeout` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(words, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _CHILDREN.add(proc)
    try:
        log, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        log, rc = f"timed out after {timeout:.0f}s\n{proc.communicate()[0]}", -9
    finally:
        _CHILDREN.discard(proc)
    return rc, log, time.perf_counter() - t0


def check_train(engine: str, dev: torch.device, root: Path, timeout: float, steps: int = 6, stop: int = 3) -> dict:
    from training.tracking import read_metrics

    cuda = dev.type == "cuda"
    env, notes = _sub_env(cuda)
    out = {"ok": False, "engine": engine, "steps": steps, "stop_after": stop, "notes": notes}
    if engine == "native":  # what training/engines/world.py does at WORLD_SIZE=1 (torchrun's value here too)
        from training.engines.world import init_distributed
        out["init_distributed_backend_world1"] = init_distributed()[3]
    # The uninterrupted reference is plain `unidiff train` (the same rank code without torchrun, which at world
    # size 1 only sets the environment; one launcher + torchrun fewer per engine keeps --cpu inside CI's budget).
    # It and the first part of the split run are independent: they run at the same time.
    box = {}
    t = threading.Thread(target=lambda: box.update(r=_run(_train_words(root, "whole", engine, cuda, steps,
                                                                         launch=False), env, timeout)))
    t.start()
    part1 = _run(_train_words(root, "split", engine, cuda, steps, [f"train.stop_after={stop}"]), env, timeout)
    t.join()
    whole = box["r"]
    part2 = _run(_train_words(root, "split", engine, cuda, steps), env, timeout) if part1[0] == 0 else part1
    for key, (rc, log, wall) in (("whole", whole), ("first", part1), ("resumed", part2)):
        out[f"{key}_rc"], out[f"{key}_wall_s"] = rc, round(wall, 2)
        if rc != 0:
            out[f"{key}_log_tail"] = log[-2000:]
    if whole[0] or part1[0] or part2[0]:
        out["error"] = f"a run failed: whole rc={whole[0]} first rc={part1[0]} resumed rc={part2[0]}"
        return out
    rows = {}
    for name in ("whole", "split"):
        rows[name] = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(root / name)}
    w, s = rows["whole"], rows["split"]
    out["resumed_at_step"] = stop if f"at step {stop}" in part2[1] else None
    out["steps_logged"] = sorted(s) == list(range(steps)) and sorted(w) == list(range(steps))
    out["pre_stop_exact"] = all(w.get(i) == s.get(i) for i in range(stop))  # same process history: determinism
    out["post_resume_exact"] = all(w.get(i) == s.get(i) for i in range(stop, steps))  # the resume itself
    common = sorted(set(w) & set(s))
    out["loss_max_abs_diff"] = max((abs(w[i][0] - s[i][0]) for i in common), default=float("nan"))
    out["grad_norm_max_abs_diff"] = max((abs(w[i][1] - s[i][1]) for i in common), default=float("nan"))
    out["final_loss"] = w[steps - 1][0] if steps - 1 in w else float("nan")
    out["ok"] = bool(out["steps_logged"] and out["resumed_at_step"] == stop and out["pre_stop_exact"]
                     and out["post_resume_exact"] and _all_finite({k: v for k, v in out.items() if "loss" in k}))
    return out


# ---- 3. throughput -------------------------------------------------------------------------------------------------
def check_throughput(dev: torch.device, warmup: int = 3, steps: int = 5) -> dict:
    from data_pipeline.loader import build_loader
    from data_pipeline.text_tokenizer import specials_for
    from training.config import load_config
    from training.diffusion import diffusion_loss
    from training.model import build_model
    from training.trainer import flops_per_token

    cuda = dev.type == "cuda"
    common = ["data.synthetic=true", "train.micro_batch_size=1", "train.global_batch_size=1",
              "train.precision=bf16", "diffusion.block_schedule=[[0,32]]"]
    if cuda:
        cfg = load_config(MINI, [*common, "model.num_hidden_layers=3", "model.first_k_dense_replace=1",
                                 "train.seq_len=4096", "model.attention=flex"])
    else:
        cfg = load_config(TINY, [*common, "train.seq_len=128", "model.attention=auto", "diffusion.block_schedule=[[0,16]]"])
    m, seq = cfg.model, cfg.train.seq_len
    model = build_model(m, "meta")
    model.to_empty(device=dev)
    with torch.no_grad():  # a fast on-device init: throughput does not depend on the exact (seeded) values
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, m.initializer_range)
        for moe in model.moe_layers():
            moe.gate.expert_bias.zero_()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    specials = specials_for(cfg)
    batches = iter(build_loader(cfg, seq_len=seq, micro_batch_size=1, dp_rank=0, dp_size=1, seed=0))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    peak = _peak_flops(name) if cuda else NOMINAL_CPU_PEAK
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = {"ok": True, "shape": f"{m.num_hidden_layers} layers ({m.first_k_dense_replace} dense), hidden "
           f"{m.hidden_size}, {m.num_experts} experts top-{m.num_experts_per_tok}, vocab {m.vocab_size}, "
           f"seq_len {seq}, micro batch 1", "attention": "flex" if cuda else "sdpa (model.attention=auto on CPU)",
           "warmup_steps": warmup, "timed_steps": steps, "peak_flops": peak, "peak_is_nominal": not cuda}
    for mode in ("auto", "off"):  # the model as configured (grouped_mm), then the per-expert loop for comparison
        for moe in model.moe_layers():
            moe.experts.grouped_gemm = mode
        times, losses, block = [], [], seq
        for i in range(warmup + steps):
            batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            sync()
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):  # = NativeEngine.autocast() for precision=bf16
                loss, metrics = diffusion_loss(model, batch, cfg.diffusion, i, specials)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(float(metrics["loss"]))
            block = int(metrics["block_size"])
            masked_frac = float(metrics["masked_frac"])
        dt = sum(times) / len(times)
        flops = flops_per_token(m, seq, 0 < block < seq, masked_frac) * seq / dt  # the trainer's accounting
        prefix = "" if mode == "auto" else "grouped_gemm_off_"
        out.update({f"{prefix}step_s": dt, f"{prefix}tokens_per_s": seq / dt, f"{prefix}flops_per_s": flops,
                    f"{prefix}mfu": flops / peak if peak else None, f"{prefix}losses": losses})
        out["block_size"] = block
        out["ok"] &= all(math.isfinite(x) for x in losses)
    out["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
    return out


# ---- driver --------------------------------------------------------------------------------------------------------
def _guarded(name: str, fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        res = fn(*args)
    except Exception as e:  # a failing check is a result, never the end of the run
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    return {"name": name, **res, "wall_s": round(time.perf_counter() - t0, 2)}


def _line(r: dict) -> str:
    keys = [k for k in r if k.endswith(("_rel_diff", "tokens_per_s", "mfu", "loss", "exact", "_gib"))]
    figs = " ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys)
    return f"{'PASS' if r['ok'] else 'FAIL'} {r['name']:<15} {r['wall_s']:7.1f}s {figs} {r.get('error', '')}".rstrip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the same checks on CPU at toy size")
    p.add_argument("--out", default=str(ROOT / "bench/results/gpu_check.json"))
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ORDER)}")
    p.add_argument("--timeout", type=float, default=0, help="per subprocess (default 150 s on GPU, 240 s on CPU)")
    p.add_argument("--budget", type=float, default=450, help="whole run: past this, write what finished and exit 1")
    args = p.parse_args(argv)
    only = [c for c in args.only.split(",") if c] or ORDER
    if set(only) - set(ORDER):
        p.error(f"--only: unknown check(s) {sorted(set(only) - set(ORDER))}; known: {', '.join(ORDER)}")
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the toy-size CPU version", file=sys.stderr)
        return 2
    if args.cpu:  # inductor's compile-worker pool (one process per core) costs more than it saves at toy size
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    t0 = time.perf_counter()
    dev = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    timeout = args.timeout or (240 if args.cpu else 150)
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def report(final: bool) -> int:
        with lock:
            checks = [results.get(k) or {"name": k, "ok": False, "error": f"did not finish within --budget "
                                         f"{args.budget:.0f}s"} for k in ORDER if k in only]
        rep = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch": torch.__version__, "cpu_mode": bool(args.cpu), "checks": checks,
               "ok": all(c["ok"] for c in checks), "wall_s": round(time.perf_counter() - t0, 2)}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1, default=str))
        failed = [c["name"] for c in checks if not c["ok"]]
        print(f"gpu_check: {len(checks) - len(failed)}/{len(checks)} passed on {rep['device']} in "
              f"{rep['wall_s']:.0f}s{' (FAILED: ' + ', '.join(failed) + ')' if failed else ''}"
              f"{'' if final else ' (budget exceeded, stopped)'} -> {out}", flush=True)
        return 1 if failed else 0

    def over_budget():  # a hung kernel or collective must not eat the whole GPU loan: report what finished
        for proc in list(_CHILDREN):
            _kill(proc)
        report(final=False)
        os._exit(1)

    watchdog = threading.Timer(args.budget, over_budget)
    watchdog.daemon = True
    watchdog.start()

    def run(name, fn, *a):
        r = _guarded(name, fn, *a)
        with lock:
            results[name] = r
        print(_line(r), flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        # The train checks are subprocesses: they run in background threads while this process does the unit
        # subset. On the GPU the throughput check waits for them so nothing else shares the device while it times.
        threads = [threading.Thread(target=run, args=(f"train_{e}", check_train, e, dev, Path(tmp) / e, timeout),
                                    daemon=True) for e in ENGINES if f"train_{e}" in only]
        for t in threads:
            t.start()
        for name, fn in (("model_fwd_bwd", check_model_fwd_bwd), ("flex_vs_dense", check_flex_vs_dense),
                         ("grouped_mm", check_grouped_mm)):
            if name in only:
                run(name, fn, dev)
        if args.cpu and "throughput" in only:
            run("throughput", check_throughput, dev)
        for t in threads:
            t.join()
        if not args.cpu and "throughput" in only:
            run("throughput", check_throughput, dev)
    watchdog.cancel()
    return report(final=True)


if __name__ == "__main__":
    sys.exit(main())
