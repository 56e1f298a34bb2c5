"""Data pipeline throughput and the loader at scale.

1. pretokenize images/s end to end (raw tar read, PIL decode, resize, ViT+VQ, layout, npy/tar writing, index,
   manifest; the tokenizer process plus --workers CPU workers) vs the bare image-tokenizer forward on the very
   batches pretokenize forwards (each shard's `prepare` run again, its normalised batches kept, then only
   `ImageTokenizer.encode` timed over them: same images, same batch size, same threads):
   `pretokenize_over_bare_forward` (target >= 0.9).
2. loader tokens/s (one rank, worker processes as configured) vs a target consumption rate: one H100 training the
   16B-A1B model at 40% MFU consumes ~989e12*0.4 / (6 * 1.4e9 active params * 2 halves of block diffusion) ~= 23.5k
   tokens/s; a data-parallel rank's loader must stay above that.
3. scale: a token dir of --samples samples in --shards shards made from the real token shards of step 1 (each new
   shard is a hard link to a real tar, its index lists that tar's real entries cycled to samples/shards rows under
   new keys, so every read hits real bytes), its manifest and index columns written as pretokenize --merge writes
   them (timed: the one-off index build), then in a fresh process per rank as training starts it: loader start-up
   (build_loader + epoch plan + first batch) and peak resident memory (VmHWM) against 30 s and 2 GiB per rank, and
   its tokens/s at --scale-seq-len against the 23.5k tokens/s target.

Usage: python bench/bench_data.py [--scenes 1000] [--samples 10000000 --shards 10000] [--quick]
       [--out bench/results/bench_data.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.image_tokenizer.fit_codebook import fit_codebook  # noqa: E402
from data_pipeline.image_tokenizer.preprocess import normalise  # noqa: E402
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.pretokenize import pretokenize, probe_tokenizers  # noqa: E402
from data_pipeline.sources import list_raw_shards  # noqa: E402
from data_pipeline.sample import make_sample  # noqa: E402

TARGET_TOKENS_PER_S = 989e12 * 0.4 / (6 * 1.4e9 * 2)
STARTUP_TARGET_S, RSS_TARGET_BYTES = 30.0, 2 * 2 ** 30  # per rank

# One rank of a training job, in its own process: what it imports, builds and holds until its first batch.
RANK = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
sys.path.insert(0, os.getcwd())
import torch
from data_pipeline.config import DataConfig
from data_pipeline.loader import build_loader
a = json.loads(sys.argv[1])
torch.set_num_threads(1)
t1 = time.perf_counter()
rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
L = build_loader(DataConfig(token_dir=a["token_dir"], raw_dir="/nonexistent", pad_to_block=True), a["seq_len"],
                 a["micro"], a["rank"], a["dp"], seed=0, block_size=a["block"])
n = len(L)
it = iter(L)
next(it)
t2 = time.perf_counter()
hwm = [int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0]
t3, rows = time.perf_counter(), 0
for _ in range(a["batches"]):
    rows += next(it)["input_ids"].shape[0]
dt = time.perf_counter() - t3
print(json.dumps({"import_s": t1 - t0, "startup_s": t2 - t1, "rss_after_import": rss0, "rss_peak": hwm,
                  "batches_per_epoch": n, "documents": L.stats["documents"], "rows": L.stats["rows"],
                  "tokens_per_s": rows * a["seq_len"] / dt, "tokenizers_imported": "tokenizers" in sys.modules}))
"""


def replicate_token_dir(src: Path, out: Path, n_samples: int, n_shards: int) -> dict:
    """A token dir of n_samples in n_shards built from src's real train shards (hard links + cycled index rows)."""
    from data_pipeline.manifest import build_manifest, index_path, load_manifest, read_index
    from data_pipeline.token_shards import write_indices

    man = load_manifest(src)
    real = [(src / "train" / r["output"], read_index(src / "train" / r["output"]))
            for r in man["splits"]["train"]["shards"] if r["token_samples"]]
    (out / "train").mkdir(parents=True)
    per = n_samples // n_shards
    t0 = time.perf_counter()
    for j in range(n_shards):
        tar, idx = real[j % len(real)]
        name = f"scale-{j:06d}.tar"
        try:
            os.link(tar, out / "train" / name)
        except OSError:  # another filesystem: a symlink reads the same bytes
            os.symlink(tar.resolve(), out / "train" / name)
        rows = idx["samples"]
        samples = [[f"{rows[k % len(rows)][0]}r{k}", *rows[k % len(rows)][1:]] for k in range(per)]
        tasks: dict[str, int] = {}
        for x in samples:
            tasks[x[2]] = tasks.get(x[2], 0) + 1
        n_img = sum(x[3] for x in samples)
        stats = {"inputs": per, "ok": per, "quarantined": 0, "token_samples": per, "images": 0, "tasks": tasks,
                 "image_tokens": n_img, "text_tokens": sum(x[1] for x in samples) - n_img}
        index = {"input": name, "input_bytes": 0, "fingerprint": idx["fingerprint"], "stats": stats,
                 "quarantine": [], "truncated": "", "columns": idx["columns"], "samples": samples}
        index_path(out / "train" / name).write_text(json.dumps(index, separators=(",", ":")))
    t1 = time.perf_counter()
    manifest = build_manifest(out, man["fingerprint"], man["vocab"], man["specials"])
    t2 = time.perf_counter()
    write_indices(out, manifest)  # what pretokenize / --merge do after the manifest
    t3 = time.perf_counter()
    idx_bytes = sum(p.stat().st_size for p in (out / "train").glob("*.index.json"))
    col_bytes = sum(p.stat().st_size for p in (out / ".index").rglob("*") if p.is_file())
    return {"samples": per * n_shards, "shards": n_shards, "write_indices_s": round(t1 - t0, 1),
            "manifest_s": round(t2 - t1, 1), "index_build_s": round(t3 - t2, 1),
            "index_json_mb": round(idx_bytes / 2 ** 20, 1), "index_columns_mb": round(col_bytes / 2 ** 20, 1)}


def bare_forward(d) -> tuple[float, int]:
    """images/s of the image tokenizer's forward alone over exactly the batches pretokenize forwarded."""
    st, tok = probe_tokenizers(d)
    batches: list[torch.Tensor] = []

    def keep(u8):
        batches.append(normalise(u8, tok.mean, tok.std))
        return len(batches) - 1

    for sh in list_raw_shards(d):
        st.prepare(sh, keep)
    tok.encode(batches[0])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for x in batches:
        tok.encode(x)
    n = sum(len(x) for x in batches)
    return n / (time.perf_counter() - t0), n, time.process_time() - c0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # pretokenize's workers, once joined
    return ru.ru_utime + ru.ru_stime


def bench_scale(token_dir: Path, tmp: str, a) -> dict:
    out = Path(tmp) / "scale"
    built = replicate_token_dir(token_dir, out, a.samples, a.shards)
    args = {"token_dir": str(out), "seq_len": a.scale_seq_len, "micro": a.scale_micro_batch, "rank": 0,
            "dp": a.scale_dp, "block": 32, "batches": a.scale_batches}
    r = subprocess.run([sys.executable, "-c", RANK, json.dumps(args)], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise RuntimeError(f"scale rank process failed:\n{r.stderr[-3000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return {**built, "seq_len": a.scale_seq_len, "dp_size": a.scale_dp, "micro_batch_size": a.scale_micro_batch,
            "import_s": round(m["import_s"], 2), "startup_s": round(m["startup_s"], 2),
            "startup_over_target": round(m["startup_s"] / STARTUP_TARGET_S, 3),
            "rss_peak_mb": round(m["rss_peak"] / 2 ** 20), "rss_after_import_mb": round(m["rss_after_import"] / 2 ** 20),
            "rss_over_target": round(m["rss_peak"] / RSS_TARGET_BYTES, 3), "rows_per_epoch": m["rows"],
            "batches_per_epoch_per_rank": m["batches_per_epoch"], "tokens_per_s": round(m["tokens_per_s"]),
            "tokens_over_target": round(m["tokens_per_s"] / TARGET_TOKENS_PER_S, 2),
            "tokenizers_imported": m["tokenizers_imported"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a small run for bench/run_all.py (defaults below shrink)")
    ap.add_argument("--scenes", type=int, default=None, help="shapes scenes to pretokenize (1000; quick 40)")
    ap.add_argument("--workers", type=int, default=None, help="pretokenize CPU workers (default: cores left)")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=None, help="loader bench row length (512; quick 256)")
    ap.add_argument("--samples", type=int, default=None, help="scale token dir samples (10M; quick 100k)")
    ap.add_argument("--shards", type=int, default=None, help="scale token dir shards (10k; quick 100)")
    ap.add_argument("--scale-seq-len", type=int, default=4096)
    ap.add_argument("--scale-dp", type=int, default=8, help="data-parallel size of the measured rank (rank 0)")
    ap.add_argument("--scale-micro-batch", type=int, default=4)
    ap.add_argument("--scale-batches", type=int, default=None, help="batches timed for tokens/s (50; quick 10)")
    ap.add_argument("--skip-scale", action="store_true", help="pretokenize and loader figures only (repeat runs)")
    ap.add_argument("--out", default="bench/results/bench_data.json")
    a = ap.parse_args()
    for k, full, quick in (("scenes", 1000, 40), ("seq_len", 512, 256), ("samples", 10_000_000, 100_000),
                           ("shards", 10_000, 100), ("scale_batches", 50, 10)):
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        d = DataConfig(raw_dir=f"{tmp}/raw", token_dir=f"{tmp}/tokens", num_workers=a.loader_workers,
                       pad_to_block=True)  # documents padded to the block size 32 the benches pass
        d.image_tokenizer.path = f"{tmp}/itok"
        d.sample.train_scenes, d.sample.val_scenes = a.scenes, a.scenes // 10
        d.sample.train_docs, d.sample.val_docs = a.scenes // 10, a.scenes // 100
        make_sample(d.raw_dir, d.sample, progress=False)
        fit_codebook(d, progress=False)
        c0, w0 = time.process_time(), _children_cpu()
        r = pretokenize(d, workers=a.workers, progress=False)
        main_cpu, workers_cpu = time.process_time() - c0, _children_cpu() - w0
        pipe_ips = r["images"] / r["seconds"]
        bare_ips, n_bare, bare_cpu = bare_forward(d)
        # Loader
        L = build_loader(d, a.seq_len, 8, 0, 1, seed=0, block_size=32)
        it = iter(L)
        next(it)
        n = min(len(L) - 1, 100)
        t0 = time.perf_counter()
        rows = sum(b["input_ids"].shape[0] for b in itertools.islice(it, n))
        dt = time.perf_counter() - t0
        scale = None if a.skip_scale else bench_scale(Path(d.token_dir), tmp, a)
    res = {
        "pretokenize_images_per_s": round(pipe_ips, 1), "bare_tokenizer_images_per_s": round(bare_ips, 1),
        "images_pipeline": r["images"], "images_bare": n_bare,
        "pretokenize_over_bare_forward": round(pipe_ips / bare_ips, 3),
        # CPU seconds: the tokenizer process (its forwards + serving the workers), the workers, the bare forward.
        # bare / max(tokenizer process, workers) is the ratio with a free core each (what load cannot distort)
        "pretokenize_process_cpu_s": round(main_cpu, 2), "workers_cpu_s": round(workers_cpu, 2),
        "bare_forward_cpu_s": round(bare_cpu, 2),
        "cpu_bound_ratio": round(bare_cpu / max(main_cpu, workers_cpu, 1e-9), 3), "load_average": os.getloadavg()[0],
        "pretokenize_tokens_per_s": round(r["tokens"] / r["seconds"], 1),
        "loader_rows_per_s": round(rows / dt, 1), "loader_tokens_per_s": round(rows * a.seq_len / dt, 1),
        "target_tokens_per_s": round(TARGET_TOKENS_PER_S, 1),
        "loader_over_target": round(rows * a.seq_len / dt / TARGET_TOKENS_PER_S, 2),
        "threads": torch.get_num_threads(), "batch_size": d.image_tokenizer.batch_size, "seq_len": a.seq_len,
        "scale": scale,
    }
    print(f"pretokenize {res['pretokenize_images_per_s']} img/s end to end vs bare tokenizer forward "
          f"{res['bare_tokenizer_images_per_s']} img/s on the same {n_bare} images in batches of "
          f"{res['batch_size']} -> x{res['pretokenize_over_bare_forward']} (target 0.9; CPU s: tokenizer process "
          f"{res['pretokenize_process_cpu_s']}, workers {res['workers_cpu_s']}, bare {res['bare_forward_cpu_s']} -> "
          f"x{res['cpu_bound_ratio']} with a core each; load average {res['load_average']:.1f}); "
          f"loader {res['loader_tokens_per_s']:.0f} tok/s = x{res['loader_over_target']} of the "
          f"{res['target_tokens_per_s']:.0f} tok/s target (1 H100, 16B-A1B, 40% MFU)")
    s = scale
    if s is None:
        print("scale: skipped (--skip-scale)")
    else:
        print(f"scale: {s['samples']} samples in {s['shards']} shards (index build {s['index_build_s']} s once, "
              f"{s['index_json_mb']} MB JSON -> {s['index_columns_mb']} MB columns); rank 0 of {s['dp_size']}: "
              f"start-up {s['startup_s']} s = {s['startup_over_target']} x the {STARTUP_TARGET_S:.0f} s target "
              f"(+{s['import_s']} s imports), peak RSS {s['rss_peak_mb']} MB = {s['rss_over_target']} x 2 GiB "
              f"({s['rss_after_import_mb']} MB after imports); {s['tokens_per_s']} tok/s at seq {s['seq_len']} = "
              f"x{s['tokens_over_target']} of {TARGET_TOKENS_PER_S:.0f} tok/s")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
