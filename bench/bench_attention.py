"""Block-diffusion attention: dense 2L x 2L boolean mask under SDPA (baseline) vs the FlexAttention BlockMask path
and the tiled SDPA path (the CPU training default: SDPA over each query tile's visible key tiles), for L in
{1k, 2k, 4k} tokens of packed documents (x_t || x_0 = 2L queries and keys).

Each measurement runs in a fresh subprocess so its peak memory is its own: CUDA max_memory_allocated on GPU,
the rise of the process's peak RSS (VmHWM) on CPU. Prints the flex / dense ratios of time and memory and writes JSON.

    python bench/bench_attention.py [--lengths 1024 2048 4096] [--device cpu|cuda] [--out bench/results/attention.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _worker(path: str, length: int, device: str, heads: int, kv_heads: int, head_dim: int, block: int,
            doc_len: int, repeats: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from training.diffusion.masks import dense_training_mask, flex_training_mask
    from training.model.attention import attend, tile_mask

    gen = torch.Generator().manual_seed(0)
    # Packed documents of random lengths around doc_len (so some blocks straddle documents).
    sizes, total = [], 0
    while total < length:
        n = int(torch.randint(doc_len // 2, doc_len * 3 // 2, (1,), generator=gen))
        sizes.append(min(n, length - total))
        total += sizes[-1]
    doc = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[None].to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(1, heads, 2 * length, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, kv_heads, 2 * length, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    if path == "flex":
        build = lambda: flex_training_mask(doc, block)  # noqa: E731
    elif path == "tiled":
        build = lambda: tile_mask(dense_training_mask(doc, block))  # noqa: E731
    else:
        build = lambda: dense_training_mask(doc, block)  # noqa: E731
    mask = build()
    attend(q, k, v, mask)  # warm-up (compiles the flex kernel once per shape)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    for _ in range(repeats):
        mask = build()
        out = attend(q, k, v, mask)
    sync()
    seconds = (time.perf_counter() - t0) / repeats
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024) - base
    if path != "dense":
        parts = vars(mask).values() if path == "flex" else mask
        mask_bytes = sum(t.numel() * t.element_size() for t in parts if torch.is_tensor(t))
    else:
        mask_bytes = mask.numel() * mask.element_size()
    del out
    return {"path": path, "length": length, "seconds": seconds, "peak_bytes": int(max(peak, 0)),
            "mask_bytes": int(mask_bytes), "docs": len(sizes)}


def _run_child(args, path: str, length: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--lengths", str(length), "--device", args.device,
           "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim),
           "--block", str(args.block), "--doc-len", str(args.doc_len), "--repeats", str(args.repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        return {"path": path, "length": length, "error": res.stderr.strip().splitlines()[-1][:300]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=768, help="mean packed document length, tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "bench/results/attention.json"))
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.lengths[0], args.device, args.heads, args.kv_heads,
                                 args.head_dim, args.block, args.doc_len, args.repeats)))
        return 0
    from tqdm import tqdm

    rows = []
    for length in tqdm(args.lengths, desc="attention bench"):
        dense, flex, tiled = (_run_child(args, path, length) for path in ("dense", "flex", "tiled"))
        row = {"length": length, "dense": dense, "flex": flex, "tiled": tiled}
        if "error" not in dense and "error" not in tiled:
            row["time_ratio_tiled_over_dense"] = tiled["seconds"] / dense["seconds"]
        if "error" not in dense and "error" not in flex:
            row["time_ratio_flex_over_dense"] = flex["seconds"] / dense["seconds"]
            row["memory_ratio_flex_over_dense"] = flex["peak_bytes"] / max(dense["peak_bytes"], 1)
            row["mask_ratio_flex_over_dense"] = flex["mask_bytes"] / dense["mask_bytes"]
        rows.append(row)
    print(f"{'L':>6} {'dense ms':>10} {'flex ms':>10} {'time x':>8} {'dense MiB':>10} {'flex MiB':>10} "
          f"{'mem x':>7} {'mask x':>8} {'tiled ms':>9} {'tiled x':>8}")
    for r in rows:
        d, f, t = r["dense"], r["flex"], r["tiled"]
        if "error" in d or "error" in f:
            tiled = f"tiled x{r['time_ratio_tiled_over_dense']:.3f}" if "time_ratio_tiled_over_dense" in r else ""
            print(f"{r['length']:>6} error: {d.get('error') or f.get('error')} {tiled}")
            continue
        print(f"{r['length']:>6} {d['seconds'] * 1e3:>10.1f} {f['seconds'] * 1e3:>10.1f} "
              f"{r['time_ratio_flex_over_dense']:>8.3f} {d['peak_bytes'] / 2**20:>10.1f} "
              f"{f['peak_bytes'] / 2**20:>10.1f} {r['memory_ratio_flex_over_dense']:>7.3f} "
              f"{r['mask_ratio_flex_over_dense']:>8.4f} {t.get('seconds', float('nan')) * 1e3:>9.1f} "
              f"{r.get('time_ratio_tiled_over_dense', float('nan')):>8.3f}")
    result = {"device": args.device, "baseline": "dense 2Lx2L bool mask + SDPA", "heads": args.heads,
              "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block": args.block, "doc_len": args.doc_len,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    ok = [r for r in rows if "time_ratio_flex_over_dense" in r]
    print(f"attention bench: {len(ok)}/{len(rows)} lengths measured on {args.device}; wrote {args.out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
