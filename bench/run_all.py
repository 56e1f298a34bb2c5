"""`make bench`: every CPU benchmark of bench/ in a quick mode, one after another, each in its own process.

Quick mode shrinks each bench to a minute or so on two cores (short sequences, few steps, one engine, a toy
decoder) so the whole set checks that the benches still run end to end; the figures in docs/ come from the full
runs (`--full`: each script with its own defaults, which take tens of minutes). Results go to bench/results/quick/
(full: bench/results/), so a quick run never overwrites measured figures. gpu_check.py is not here: it is the
once-per-GPU check (`make gpu-check`).

    python bench/run_all.py [--list] [--full] [--only attention,sampler,...]
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_OUT = "bench/results/quick"

# name -> (script, quick-mode arguments); every script also takes --out (JSON results)
BENCHES: dict[str, tuple[str, list[str]]] = {
    "attention": ("bench_attention.py", ["--lengths", "256", "512", "--device", "cpu", "--heads", "4",
                                         "--kv-heads", "2", "--head-dim", "32", "--doc-len", "96", "--repeats", "1"]),
    "sampler": ("bench_sampler.py", ["--gen-length", "64", "--block", "16", "--steps", "8", "--prompt-len", "16",
                                     "--tiny-gen-length", "16"]),
    "engines": ("bench_engines.py", ["--configs", "tiny", "--engines", "native", "--steps", "2"]),
    "data": ("bench_data.py", ["--quick"]),
    "decoder": ("bench_decoder.py", ["--run-dir", "runs/bench_decoder_quick", "--methods", "consistency_training",
                                     "--grid", f"{QUICK_OUT}/bench_decoder_grid.png", "decoder.train_steps=20",
                                     "decoder.holdout=8", "distill.train_steps=4", "distill.batch_size=8",
                                     "decoder.batch_size=8"]),
}


def commands(names: list[str], full: bool) -> list[tuple[str, list[str]]]:
    out = []
    for name in names:
        script, quick = BENCHES[name]
        argv = [sys.executable, str(Path("bench") / script)]
        if not full:
            # --out before the quick arguments: bench_decoder's trailing dotlist overrides must stay last
            argv += ["--out", f"{QUICK_OUT}/{Path(script).stem}.json", *quick]
        out.append((name, argv))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--full", action="store_true", help="each bench with its own (long) defaults")
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(BENCHES)}")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"--only {','.join(unknown)}: not a bench; choose from {', '.join(BENCHES)}")
    todo = commands(names, a.full)
    if a.list:
        for _, cmd in todo:
            print(shlex.join(cmd))
        return 0
    (ROOT / QUICK_OUT).mkdir(parents=True, exist_ok=True)
    failed = []
    for name, cmd in todo:
        t0 = time.time()
        print(f"bench {name}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"bench {name}: rc={rc} in {time.time() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    print(f"benches: {len(todo) - len(failed)} ok, failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
