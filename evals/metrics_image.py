"""Closed-form image metrics (offline, no weights): PSNR and SSIM on batches of images.

Images are [B, C, H, W] floats; `data_range` is max - min of the pixel scale (2.0 for [-1, 1], 1.0 for [0, 1]).
SSIM follows Wang et al. 2004 as `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`: an 11x11 Gaussian window, K1=0.01, K2=0.03, mean over the valid (unpadded) area and
over channels. Both return one value per image; average them for a dataset.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))).float()


def _gauss_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    a, b = a.double(), b.double()
    c = a.shape[1]
    g = _gauss_window(win, sigma)
    kh = g.view(1, 1, win, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, win).repeat(c, 1, 1, 1)

    def blur(x):  # separable Gaussian, 'valid' area only (skimage crops the border of half the window)
        return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1).float()
