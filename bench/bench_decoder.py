"""Decoder acceptance bench: teacher reconstruction, distilled student vs undistilled teacher, speed, PNG grid.

Trains (or reuses) a toy teacher, distils an 8-step student with the chosen method(s), then on held-out pairs:
  (1) tokenize -> decode PSNR/SSIM with the 50-step teacher,
  (2) student @8 vs teacher @8: PSNR to the teacher-50 output (same initial noise) and to the ground truth,
  (3) student @8 vs teacher @50: quality gap and wall-clock speed-up (ratio measured in this run),
  (4) a PNG grid: ground truth, teacher 50, teacher 8, student 8, student 2.
Usage: python bench/bench_decoder.py [--run-dir runs/bench_decoder] [--methods consistency_training,...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from evals.metrics_image import psnr, ssim  # noqa: E402
from training.config import load_config  # noqa: E402
from training.decoder import checkpoint  # noqa: E402
from training.decoder.latent import latent_shape  # noqa: E402
from training.decoder.pairs import decoder_pairs  # noqa: E402
from training.decoder.decode import decode_tokens, load_decoder  # noqa: E402
from training.decoder.train import distill, train_decoder  # noqa: E402


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def save_grid(rows: list[torch.Tensor], path: Path) -> None:
    from PIL import Image

    n = rows[0].shape[0]
    h, w = rows[0].shape[-2:]
    grid = torch.ones(3, len(rows) * (h + 2), n * (w + 2))
    for r, imgs in enumerate(rows):
        for c in range(n):
            grid[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = (imgs[c] + 1) / 2
    arr = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default="runs/bench_decoder")
    ap.add_argument("--config", default=None, help="experiment config (e.g. configs/experiments/quickstart.yaml)")
    ap.add_argument("--methods", default="trajectory_distillation,consistency_training,consistency_distillation")
    ap.add_argument("--student-steps", type=int, default=8)
    ap.add_argument("--out", default="bench/results/bench_decoder.json")
    ap.add_argument("--grid", default="bench/results/bench_decoder_grid.png")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    a = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    run_dir = Path(a.run_dir)
    base = [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}", f"distill.steps={a.student_steps}"] + a.overrides
    cfg = load_config(a.config, base)
    t_dir = run_dir / "decoder" / "checkpoints"
    t_train = 0.0
    if checkpoint.latest_path(t_dir) is None or \
            checkpoint.load_latest(t_dir)[0] < cfg.decoder.train_steps:
        _, t_train = _timed(lambda: train_decoder(cfg))
    teacher, _ = load_decoder(t_dir)
    gt, ids = map(torch.stack, zip(*decoder_pairs(cfg.decoder, "holdout", data_cfg=cfg.data)))
    noise = torch.randn((gt.shape[0], *latent_shape(cfg.decoder)), generator=torch.Generator().manual_seed(7))
    res: dict = {"n_images": int(gt.shape[0]), "teacher_train_s": round(t_train, 1), "config": base}

    def score(name, imgs, ref50=None):
        r = {"psnr_gt": float(psnr(imgs, gt).mean()), "ssim_gt": float(ssim(imgs, gt).mean())}
        if ref50 is not None:
            r["psnr_to_teacher50"] = float(psnr(imgs, ref50).mean())
        res[name] = r
        return r

    t50, s_t50 = _timed(lambda: decode_tokens(teacher, ids, steps=50, sampler="euler", noise=noise))
    score("teacher_50", t50)
    t8, s_t8 = _timed(lambda: decode_tokens(teacher, ids, steps=a.student_steps, sampler="euler", noise=noise))
    score(f"teacher_{a.student_steps}", t8, t50)
    score("teacher_2", decode_tokens(teacher, ids, steps=2, sampler="euler", noise=noise), t50)
    res["time_s"] = {"teacher_50": s_t50, f"teacher_{a.student_steps}": s_t8}
    rows = [gt[:8], t50[:8], t8[:8]]
    for method in a.methods.split(","):
        mcfg = load_config(a.config, base + [f"run.name={run_dir.name}_{method}", f"distill.method={method}",
                                         f"distill.teacher={t_dir}"])
        s_dir, s_train = _timed(lambda: distill(mcfg))
        student, _ = load_decoder(s_dir)
        s8, s_s8 = _timed(lambda: decode_tokens(student, ids, steps=a.student_steps, sampler="turbo", noise=noise,
                                                seed=11))
        s2 = decode_tokens(student, ids, steps=2, sampler="turbo", noise=noise, seed=11)
        score(f"{method}_{a.student_steps}", s8, t50)
        score(f"{method}_2", s2, t50)
        # Fresh re-noising (released) draws a new sample at every step, so PSNR to the teacher-50 output of the same
        # initial noise also counts sample diversity; the deterministic turbo (re-noise with the model's own noise
        # estimate) keeps the initial noise and measures how well the student follows the teacher's ODE.
        for k in (a.student_steps, 2):
            score(f"{method}_{k}_deterministic",
                  decode_tokens(student, ids, steps=k, sampler="turbo", noise=noise, stochast_ratio=0.0), t50)
        res["time_s"][f"{method}_{a.student_steps}"] = s_s8
        res[f"{method}_train_s"] = round(s_train, 1)
        res[f"{method}_speedup_vs_teacher50"] = s_t50 / s_s8
        if len(rows) == 3:
            rows += [s8[:8], s2[:8]]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_grid(rows, Path(a.grid))
    Path(a.out).write_text(json.dumps(res, indent=1))
    k = a.student_steps
    print(json.dumps(res, indent=1))
    for method in a.methods.split(","):
        s, t, sd = res[f"{method}_{k}"], res[f"teacher_{k}"], res[f"{method}_{k}_deterministic"]
        s2, t2 = res[f"{method}_2_deterministic"], res["teacher_2"]
        print(f"{method}: student@{k} vs teacher@{k}: PSNR->GT {s['psnr_gt']:.2f} vs {t['psnr_gt']:.2f} dB, "
              f"SSIM {s['ssim_gt']:.3f} vs {t['ssim_gt']:.3f}, PSNR->T50 {s['psnr_to_teacher50']:.2f} "
              f"(deterministic {sd['psnr_to_teacher50']:.2f}) vs {t['psnr_to_teacher50']:.2f} dB; @2: PSNR->T50 "
              f"{s2['psnr_to_teacher50']:.2f} vs {t2['psnr_to_teacher50']:.2f}, PSNR->GT {s2['psnr_gt']:.2f} vs "
              f"{t2['psnr_gt']:.2f}; "
              f"teacher@50 PSNR->GT {res['teacher_50']['psnr_gt']:.2f}; speed-up vs teacher@50 "
              f"{res[f'{method}_speedup_vs_teacher50']:.1f}x")
    print(f"grid: {a.grid}  json: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
