"""PNG figures of the eval report (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def image_grid(images, titles, path: Path, cols: int | None = None) -> Path:
    """PIL images in a grid, each with a short title; returns the path written."""
    n = max(len(images), 1)
    cols = cols or min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i], interpolation="nearest")
            title = titles[i] if i < len(titles) else ""
            ax.set_title(title if len(title) <= 40 else title[:37] + "...", fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(series: dict[str, list[dict]], path: Path) -> Path | None:
    """series: source name -> metrics.jsonl rows; plots every loss-like key over steps, one panel per source."""
    panels = []
    for name, rows in series.items():
        keys = sorted({k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
        if keys:
            panels.append((name, rows, keys))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (name, rows, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                ax.plot(*zip(*pts), label=k, linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_heatmap(loads, path: Path, title: str) -> Path | None:
    """loads: per MoE layer a [E] tensor/list of token-expert assignments -> heatmap of load / mean load."""
    import numpy as np

    if not loads:
        return None
    m = np.stack([np.asarray(l, dtype=np.float64) for l in loads])
    m = m / np.maximum(m.mean(1, keepdims=True), 1e-9)
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * m.shape[1] + 2), 0.4 * m.shape[0] + 1.5))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
