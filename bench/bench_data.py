"""Data pipeline throughput.

1. pretokenize images/s end to end (raw tar read, PIL decode, resize, ViT+VQ, layout, npy/tar writing, index) vs
   the bare image-tokenizer forward on the same images (already-resized pixel tensors, same batch size, same
   threads): the ratio bare/pipeline is the pipeline's overhead factor.
2. loader tokens/s (one rank, worker processes as configured) vs a target consumption rate: one H100 training the
   16B-A1B model at 40% MFU consumes ~989e12*0.4 / (6 * 1.4e9 active params * 2 halves of block diffusion) ~= 23.5k
   tokens/s; a data-parallel rank's loader must stay above that.

Usage: python bench/bench_data.py [--scenes 1000] [--out bench/results/bench_data.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.image_tokenizer.fit_codebook import fit_codebook, iter_raw_images, understanding_pixels  # noqa
from data_pipeline.image_tokenizer.load import load_image_tokenizer  # noqa: E402
from data_pipeline.image_tokenizer.preprocess import generate_crop_size_list, to_pixel_values, var_center_crop  # noqa
from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.pretokenize import pretokenize  # noqa: E402
from data_pipeline.sample import make_sample  # noqa: E402

TARGET_TOKENS_PER_S = 989e12 * 0.4 / (6 * 1.4e9 * 2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1, help="pretokenize processes (1: compare with 1 forward)")
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default="bench/results/bench_data.json")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as tmp:
        d = DataConfig(raw_dir=f"{tmp}/raw", token_dir=f"{tmp}/tokens", num_workers=a.loader_workers)
        d.image_tokenizer.path = f"{tmp}/itok"
        d.sample.train_scenes, d.sample.val_scenes = a.scenes, a.scenes // 10
        d.sample.train_docs, d.sample.val_docs = a.scenes // 10, a.scenes // 100
        make_sample(d.raw_dir, d.sample, progress=False)
        fit_codebook(d, progress=False)
        r = pretokenize(d, workers=a.workers, progress=False)
        pipe_ips = r["images"] / r["seconds"]
        # Bare forward on the very same images, pre-resized exactly as pretokenize does.
        tok = load_image_tokenizer(d.image_tokenizer.path)
        icfg = d.image_tokenizer
        sizes = generate_crop_size_list(icfg.gen_max_patches, icfg.resize_factor)
        pix = []
        for split in ("train", "val"):
            for _, img, meta in iter_raw_images(Path(d.raw_dir) / split, d):
                pix.append(understanding_pixels(img, icfg, tok))
        # caption pairs also get a generation crop (t2i); add those so the image count matches
        for split in ("train", "val"):
            for key, img, meta in iter_raw_images(Path(d.raw_dir) / split, d):
                if "-cap-" in key or key.startswith("photo-") and "doc" not in key:
                    pix.append(to_pixel_values(var_center_crop(img, sizes, scale=True)))
        tok.encode_images(pix[:icfg.batch_size], icfg.batch_size)  # warm-up
        t0 = time.perf_counter()
        tok.encode_images(pix, icfg.batch_size)
        bare_ips = len(pix) / (time.perf_counter() - t0)
        # Loader
        L = build_loader(d, a.seq_len, 8, 0, 1, seed=0, block_size=32)
        it = iter(L)
        next(it)
        n = min(len(L) - 1, 100)
        t0 = time.perf_counter()
        rows = sum(b["input_ids"].shape[0] for b in itertools.islice(it, n))
        dt = time.perf_counter() - t0
    res = {
        "pretokenize_images_per_s": round(pipe_ips, 1), "bare_tokenizer_images_per_s": round(bare_ips, 1),
        "images_pipeline": r["images"], "images_bare": len(pix),
        "overhead_factor_bare_over_pipeline": round(bare_ips / pipe_ips, 2),
        "pretokenize_tokens_per_s": round(r["tokens"] / r["seconds"], 1),
        "loader_rows_per_s": round(rows / dt, 1), "loader_tokens_per_s": round(rows * a.seq_len / dt, 1),
        "target_tokens_per_s": round(TARGET_TOKENS_PER_S, 1),
        "loader_over_target": round(rows * a.seq_len / dt / TARGET_TOKENS_PER_S, 2),
        "threads": torch.get_num_threads(), "batch_size": d.image_tokenizer.batch_size, "seq_len": a.seq_len,
    }
    print(f"pretokenize {res['pretokenize_images_per_s']} img/s end to end vs bare tokenizer "
          f"{res['bare_tokenizer_images_per_s']} img/s -> overhead x{res['overhead_factor_bare_over_pipeline']}; "
          f"loader {res['loader_tokens_per_s']:.0f} tok/s = x{res['loader_over_target']} of the "
          f"{res['target_tokens_per_s']:.0f} tok/s target (1 H100, 16B-A1B, 40% MFU)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
