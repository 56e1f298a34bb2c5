"""`unidiff tokenizer fit-codebook`: fit the VQ codebook by spherical k-means on ViT features of a dataset.

For users without a released codebook, and for the bundled default, whose ViT is a seeded random one (or loaded
from `data.image_tokenizer.vit_init`). The features are exactly what encoding matches against the codebook:
L2-normalised quant_conv outputs, so k-means under cosine similarity gives the encoder's own nearest-code rule.

The report measures what later stages need: codebook usage (perplexity, dead codes) and reconstructability —
each code's mean pixel patch, pasted back per token, should keep the shapes world's colours and shapes (scored by
the shapes detector) and distinct palette colours must get distinct codes.
"""
from __future__ import annotations

import os
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_pipeline import shapes
from data_pipeline.image_tokenizer.load import (ImageTokenizer, build_image_tokenizer, load_image_tokenizer,
                                                save_image_tokenizer)
from data_pipeline.image_tokenizer.probe import shape_probe
from data_pipeline.image_tokenizer.raw_images import iter_raw_images
from data_pipeline.image_tokenizer.prepare import pixel_values, prepare_pixels
from data_pipeline.image_tokenizer.preprocess import from_pixel_values


def single_thread_unless_set() -> None:
    """Measured on 2 shared cores: the tiny ViT runs ~40x slower with 2 intra-op threads than with 1 (spin-wait
    contention), so CPU commands default to one thread unless OMP_NUM_THREADS says otherwise."""
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(1)


def understanding_pixels(img, icfg, model: ImageTokenizer) -> torch.Tensor:
    """The features k-means fits are those of prompt images: the understanding mode of the shared recipe."""
    return prepare_pixels(img, model, icfg, "understand")


@torch.no_grad()
def collect_features(model: ImageTokenizer, pixels: list[torch.Tensor], batch: int) -> torch.Tensor:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for px in pixels:
        groups.setdefault(tuple(px.shape), []).append(px)
    feats = []
    for items in groups.values():
        for s in range(0, len(items), batch):
            z = model.unit_features(torch.stack(items[s:s + batch]))
            feats.append(z.reshape(-1, z.shape[-1]))
    return torch.cat(feats)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit rows x [N, D] -> (unit centroids [k, D], cluster sizes [k]). Dead clusters are re-seeded each
    iteration with the points farthest from their centroid, so every code ends up used on the fitting data."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    # Init from distinct feature vectors (duplicates are common: flat background patches).
    uniq = torch.unique(x, dim=0)
    pick = torch.randperm(uniq.shape[0], generator=g)[:k]
    c = uniq[pick]
    if c.shape[0] < k:  # fewer distinct vectors than codes: pad with random directions
        c = torch.cat([c, F.normalize(torch.randn(k - c.shape[0], x.shape[1], generator=g), dim=-1)])
    counts = torch.zeros(k)
    for _ in range(iters):
        sim = x @ c.t()
        best, assign = sim.max(1)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), c)
        dead = (counts == 0).nonzero().flatten()
        if dead.numel():
            far = best.argsort()[:dead.numel()]  # worst-served points become the dead codes' new centres
            new[dead[:far.numel()]] = x[far]
        c = new
    assign = (x @ c.t()).argmax(1)
    return c, torch.bincount(assign, minlength=k).float()


def usage_stats(ids: torch.Tensor, k: int) -> dict:
    counts = torch.bincount(ids.flatten(), minlength=k).double()
    p = counts / counts.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"perplexity": round(math.exp(ent), 2), "used": int((counts > 0).sum()), "dead": int((counts == 0).sum()),
            "codebook_size": k}


@torch.no_grad()
def code_patch_means(model: ImageTokenizer, pixels: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Mean pixel patch per code [k, 3, p, p] over the given images (codes never seen: grey)."""
    p, k = model.patch_size, model.codebook_size
    sums = torch.zeros(k, 3 * p * p, dtype=torch.float64)
    cnt = torch.zeros(k, dtype=torch.float64)
    ids_all = model.encode_images(pixels, batch)
    for px, ids in zip(pixels, ids_all):
        patches = F.unfold(px[None], p, stride=p)[0].t().double()  # [N, 3*p*p] raster order
        sums.index_add_(0, ids.flatten(), patches)
        cnt.index_add_(0, ids.flatten(), torch.ones(ids.numel(), dtype=torch.float64))
    means = torch.where(cnt[:, None] > 0, sums / cnt.clamp(min=1)[:, None], torch.zeros_like(sums))
    return means.float().view(k, 3, p, p)


def reconstruct(ids: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """VQ ids [gh, gw] -> [3, gh*p, gw*p] image in [-1, 1] from per-code mean patches."""
    gh, gw = ids.shape
    k, _, p, _ = means.shape
    cols = means[ids.flatten()].view(gh * gw, 3 * p * p).t()[None]
    return F.fold(cols, (gh * p, gw * p), p, stride=p)[0]


@torch.no_grad()
def codebook_report(model: ImageTokenizer, dcfg, train_pixels: list[torch.Tensor], raw_val_dir: Path) -> dict:
    icfg = dcfg.image_tokenizer
    means = code_patch_means(model, train_pixels, icfg.batch_size)
    val = [(understanding_pixels(img, icfg, model), meta) for _, img, meta in
           iter_raw_images(raw_val_dir, dcfg, dedupe=True)]
    report: dict = {}
    if val:
        ids = model.encode_images([v[0] for v in val], icfg.batch_size)
        report["val_usage"] = usage_stats(torch.cat([i.flatten() for i in ids]), model.codebook_size)
        mse, det, n_shapes = [], 0, 0
        for (px, meta), i in zip(val, ids):
            rec = reconstruct(i, means)
            mse.append(F.mse_loss(rec, px).item())
            if meta.get("source") == "shapes" and px.shape[-1] == meta["scene"]["image_size"]:
                scene = shapes.Scene.from_json(meta["scene"])
                det += shapes.detect(from_pixel_values(rec)).key() == scene.key()
                n_shapes += 1
        # PSNR on [-1, 1] images: peak-to-peak 2.
        report["val_psnr_code_means"] = round(10 * math.log10(4 / max(float(np.mean(mse)), 1e-12)), 2)
        if n_shapes:
            report["val_shapes_detect_from_codes"] = round(det / n_shapes, 4)
            report["val_shapes_images"] = n_shapes
    # Distinct palette colours (and background) must map to disjoint code sets on flat patches.
    s = icfg.image_size
    flat = {name: pixel_values(shapes.Image.new("RGB", (s, s), rgb), model) for name, rgb in
            [("background", shapes.BACKGROUND), *shapes.COLOURS.items()]}
    codes = {n: set(model.encode(px[None])[0].flatten().tolist()) for n, px in flat.items()}
    names = list(codes)
    overlaps = [f"{a}/{b}" for i, a in enumerate(names) for b in names[i + 1:] if codes[a] & codes[b]]
    report["flat_colour_codes_disjoint"] = not overlaps
    if overlaps:
        report["flat_colour_overlaps"] = overlaps
    return report


def initial_tokenizer(icfg, init_from: str = "") -> ImageTokenizer:
    """The tokenizer a fit or a training run starts from: the dir `init_from` (with its codebook rebuilt when
    data.image_tokenizer.num_embeddings asks for another size), else a seeded random one from `icfg`."""
    if not init_from:
        return build_image_tokenizer(icfg)
    model = load_image_tokenizer(init_from)
    if model.codebook_size != icfg.num_embeddings:  # new codebook size: rebuild the embedding
        model.vqmodel.quantize.embedding = torch.nn.Embedding(icfg.num_embeddings, model.vqmodel.config.embed_dim)
        model.vqmodel.config.num_embeddings = icfg.num_embeddings
    return model


def fit_codebook(dcfg, out: str | Path | None = None, progress: bool = True) -> dict:
    icfg = dcfg.image_tokenizer
    out = Path(out or icfg.path)
    t0 = time.time()
    torch.manual_seed(icfg.seed)
    model = initial_tokenizer(icfg, icfg.vit_init)
    raw = Path(dcfg.raw_dir)
    pixels = [understanding_pixels(img, icfg, model) for _, img, _ in
              tqdm(iter_raw_images(raw / "train", dcfg, dedupe=True), desc="fit-codebook: read images", disable=not progress)]
    if not pixels:
        raise FileNotFoundError(f"no valid images under {raw / 'train'}: set data.raw_dir or run "
                                f"`unidiff data make-sample`")
    feats = collect_features(model, pixels, icfg.batch_size)
    n_total = feats.shape[0]
    if n_total > icfg.kmeans_max_features:
        g = torch.Generator().manual_seed(icfg.seed)
        feats = feats[torch.randperm(n_total, generator=g)[:icfg.kmeans_max_features]]
    cents, counts = spherical_kmeans(feats, icfg.num_embeddings, icfg.kmeans_iters, icfg.seed)
    model.vqmodel.quantize.embedding.weight.data.copy_(cents)
    fingerprint = save_image_tokenizer(model, out)
    report = {"images": len(pixels), "features": n_total, "kmeans_features": int(feats.shape[0]),
              "fit_usage": usage_stats(torch.repeat_interleave(torch.arange(len(counts)), counts.long()),
                                       icfg.num_embeddings),
              "vit": icfg.vit_init or f"random(seed={icfg.seed})", "fingerprint": fingerprint}
    report.update(codebook_report(model, dcfg, pixels, raw / "val"))
    report.update(shape_probe(model, dcfg))
    report["seconds"] = round(time.time() - t0, 2)
    (out / "codebook_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    vu = report.get("val_usage", report["fit_usage"])
    print(f"fit-codebook: {report['images']} images, {n_total} patches -> {icfg.num_embeddings} codes; val "
          f"perplexity {vu['perplexity']}, dead {vu['dead']}, detect-from-codes "
          f"{report.get('val_shapes_detect_from_codes', 'n/a')}, shape-kind probe "
          f"{report.get('probe_shape_kind', 'n/a')}, colours disjoint "
          f"{report['flat_colour_codes_disjoint']} -> {out} in {report['seconds']}s")
    return report

