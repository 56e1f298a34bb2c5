"""Image helpers shared by the generation tasks: tensor <-> PIL, PSNR / SSIM, and the shapes-world scoring.

PSNR / SSIM come from `evals.metrics_image` (the decoder's closed-form implementations; data range 2 for [-1, 1]).
"""
from __future__ import annotations

import torch

from data_pipeline.image_tokenizer.preprocess import from_pixel_values as to_pil  # noqa: F401  ([-1, 1] -> RGB)


def resize_to(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return torch.nn.functional.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def psnr_ssim(pred: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB, capped at 100 for identical images) and SSIM between two [3, H, W] images in [-1, 1]."""
    from evals.metrics_image import psnr, ssim

    a, b = pred[None].float().cpu(), ref[None].float().cpu()
    return min(float(psnr(a, b, data_range=2.0)[0]), PSNR_CAP), float(ssim(a, b, data_range=2.0)[0])


PSNR_CAP = 100.0

CATEGORIES = ("exact", "count", "colour", "shape", "position")


def scene_scores(expected, found) -> dict[str, float]:
    """GenEval-style categories for one generated shapes image, from the deterministic detector's scene:
    exact (whole scene), count (number of shapes), and per expected shape: position (its cell is occupied),
    colour (a shape of its colour in its cell), shape (a shape of its kind in its cell)."""
    got = {(s.row, s.col): s for s in found.shapes}
    n = max(len(expected.shapes), 1)
    pos = sum((s.row, s.col) in got for s in expected.shapes) / n
    col = sum((s.row, s.col) in got and got[(s.row, s.col)].colour == s.colour for s in expected.shapes) / n
    kind = sum((s.row, s.col) in got and got[(s.row, s.col)].kind == s.kind for s in expected.shapes) / n
    return {"exact": float(expected.key() == found.key()), "count": float(len(expected.shapes) == len(found.shapes)),
            "colour": col, "shape": kind, "position": pos}
