"""`unidiff tokenizer train`: the SigLIP-VQ image tokenizer trained on the raw shards' image-text pairs.

Phase 1 (`siglip_steps`): the ViT and a small text tower under the pairwise sigmoid loss (training/tokenizer/siglip.py).
Phase 2 (`vq_steps`): the ViT frozen; the codebook initialised by spherical k-means on its features (fit-codebook's
own code) and trained with commitment loss and dead-code restarts (training/tokenizer/vq_train.py). The result is
written in the released `image_tokenizer/` layout (save_image_tokenizer), so pretokenize, the decoder's pairs and the
evals load it unchanged, with fit-codebook's `codebook_report.json` plus the shape probe and the training figures.

Data parallel over the ranks of `launch local --command "tokenizer train"` (gloo on CPU, NCCL on GPUs): each rank
embeds its share of the global batch, the embeddings are all-gathered so every rank computes the loss of the whole
batch (its negatives are the global batch, as in SigLIP), and the gradients are summed. Resumable from the stage's
checkpoints (<run>/tokenizer/checkpoints, the one CheckpointManager); batches and restarts depend only on the step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from tqdm import tqdm

from data_pipeline.image_tokenizer.fit_codebook import (codebook_report, collect_features, initial_tokenizer,
                                                        spherical_kmeans, usage_stats)
from data_pipeline.image_tokenizer.load import save_image_tokenizer
from data_pipeline.image_tokenizer.probe import shape_probe
from training.config_errors import ConfigError
from training.decoder import checkpoint
from training.engines.world import init_distributed
from training.lr_schedule import warmup_cosine
from training.tokenizer.pairs import batch_rows, load_pairs
from training.tokenizer.siglip import ImageHead, TextTower, pair_accuracy, sigmoid_loss
from training.tokenizer.vq_train import PixelHead, restart_dead_codes, vq_loss
from training.tracking import Tracker


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def _gather_keep_local_grad(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Every rank's rows in rank order; this rank's own rows are `x` itself, so the backward of a loss over the
    whole batch gives this rank the exact gradient through its own rows (the others' are constants here)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def _sum_grads(params: list[torch.nn.Parameter], scale: float = 1.0) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if _distributed() and grads:
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, f in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(f)
    if scale != 1.0:
        for g in grads:
            g.mul_(scale)


@torch.no_grad()
def _kmeans_init(model, pairs, t, icfg, device, rank: int) -> dict:
    """Rank 0 fits (fit-codebook's spherical k-means on unit features), every rank takes its centroids."""
    emb = model.vqmodel.quantize.embedding.weight
    if rank == 0:
        px = list(pairs.pixels[:t.kmeans_images].to(device))
        feats = collect_features(model, px, icfg.batch_size).float().cpu()
        if feats.shape[0] > icfg.kmeans_max_features:
            g = torch.Generator().manual_seed(icfg.seed)
            feats = feats[torch.randperm(feats.shape[0], generator=g)[:icfg.kmeans_max_features]]
        cents, _ = spherical_kmeans(feats, model.codebook_size, icfg.kmeans_iters, icfg.seed)
        emb.copy_(cents.to(emb))
    if _distributed():
        dist.broadcast(emb.data, src=0)
    return {"kmeans_images": min(t.kmeans_images, len(pairs))}


def train_tokenizer(cfg, out: str | Path | None = None, progress: bool = True) -> dict:
    """Train, write the tokenizer dir (default data.image_tokenizer.path) and return its report (rank 0; {} on
    the other ranks and when stopped early by tokenizer_train.stop_after)."""
    t, dcfg = cfg.tokenizer_train, cfg.data
    icfg = dcfg.image_tokenizer
    rank, world, device, _ = init_distributed(cfg.train.collective_timeout_s)
    if t.batch_size % world:
        raise ConfigError(f"tokenizer_train.batch_size={t.batch_size} is not allowed: must be divisible by the "
                          f"{world} data-parallel ranks")
    out = Path(out or icfg.path)
    stage_dir = Path(cfg.run_dir) / "tokenizer"
    ckpt_dir = stage_dir / "checkpoints"
    t0 = time.time()
    torch.manual_seed(t.seed)
    model = initial_tokenizer(icfg, t.init_from)
    pairs = load_pairs(dcfg, model, t.text_max_len)
    text = TextTower(pairs.vocab_size, t.text_width, t.text_depth, t.text_heads, t.text_max_len, t.embed_dim)
    head = ImageHead(model.visual.config.hidden_size, t.embed_dim)
    pixel_head = PixelHead(model.vqmodel.config.embed_dim, model.patch_size)
    for m in (model, text, head, pixel_head):
        m.to(device).train()
    siglip_params = [*model.visual.parameters(), *text.parameters(), *head.parameters()]
    vq_params = [*model.vqmodel.parameters(), *pixel_head.parameters()]
    opt_siglip = torch.optim.AdamW(siglip_params, lr=t.lr, weight_decay=t.weight_decay)
    opt_vq = torch.optim.AdamW(vq_params, lr=t.vq_lr, weight_decay=0.0)
    last_used = torch.zeros(model.codebook_size, dtype=torch.long)
    total, start = t.siglip_steps + t.vq_steps, 0
    found = checkpoint.load_latest(ckpt_dir, collective=True) if t.resume == "auto" else None
    if found is not None:
        start, state = found
        model.load_state_dict(state["tokenizer"])
        text.load_state_dict(state["text"])
        head.load_state_dict(state["head"])
        pixel_head.load_state_dict(state["pixel_head"])
        opt_siglip.load_state_dict(state["optimizer"]["siglip"])
        opt_vq.load_state_dict(state["optimizer"]["vq"])
        last_used = state["vq"]["last_used"].long()
    tracker = Tracker(cfg, stage_dir, enabled=rank == 0, job_type="tokenizer-train")
    info: dict = {"pairs": len(pairs), "world": world, "resumed_from": start}
    bar = tqdm(range(start, total), desc="tokenizer train", disable=not progress or rank != 0, initial=start,
               total=total)
    stopped = False
    for step in bar:
        rows = batch_rows(len(pairs), t.batch_size, step, t.seed, rank, world)
        px = pairs.pixels[rows].to(device)
        if step < t.siglip_steps:
            lr = warmup_cosine(step, t.lr, t.min_lr, t.warmup_steps, t.siglip_steps)
            img = _gather_keep_local_grad(head(model.visual(px)), rank, world)
            txt = _gather_keep_local_grad(text(pairs.ids[rows].to(device), pairs.lengths[rows].to(device)), rank, world)
            loss = sigmoid_loss(img, txt, head.log_t, head.bias)
            opt_siglip.zero_grad(set_to_none=True)
            loss.backward()
            _sum_grads(siglip_params)
            if world > 1:  # t and b enter the loss directly: each rank has their whole gradient, not a share
                for p in (head.log_t, head.bias):
                    p.grad.div_(world)
            params, opt = siglip_params, opt_siglip
            metrics = {"tokenizer/siglip_loss": float(loss.detach()), "tokenizer/pair_acc": pair_accuracy(img, txt),
                       "tokenizer/temperature": float(head.log_t.detach().exp())}
        else:
            if step == t.siglip_steps:
                info.update(_kmeans_init(model, pairs, t, icfg, device, rank))
            lr = warmup_cosine(step - t.siglip_steps, t.vq_lr, 0.1 * t.vq_lr, 0, t.vq_steps)
            with torch.no_grad():
                feats = model.visual(px)
            loss, ids, z = vq_loss(model.vqmodel, feats, t.commitment, pixel_head, px, t.pixel_weight)
            opt_vq.zero_grad(set_to_none=True)
            loss.backward()
            _sum_grads(vq_params, 1.0 / world)  # a mean over each rank's tokens: the mean of the ranks' is global
            params, opt = vq_params, opt_vq
            metrics = {"tokenizer/vq_loss": float(loss.detach())}
        for g in opt.param_groups:
            g["lr"] = lr
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        if step >= t.siglip_steps:
            metrics["tokenizer/restarts"] = restart_dead_codes(model.vqmodel, last_used, ids.cpu(), z,
                                                               step - t.siglip_steps + 1, t.dead_code_after, t.seed)
            metrics["tokenizer/codes_used"] = int(ids.unique().numel())
        metrics.update({"tokenizer/lr": lr, "tokenizer/grad_norm": float(gnorm)})
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if (step + 1) % t.log_every == 0 or step + 1 == total:
            tracker.log(step + 1, metrics, console=False)
        info.update({k.split("/", 1)[1]: v for k, v in metrics.items() if k.endswith("loss") or k.endswith("acc")})
        stopped = bool(t.stop_after) and step + 1 - start >= t.stop_after
        if step + 1 == total or stopped or (t.save_every and (step + 1) % t.save_every == 0):  # collective
            checkpoint.save(ckpt_dir, step + 1, {
                "tokenizer": model.state_dict(), "text": text.state_dict(), "head": head.state_dict(),
                "pixel_head": pixel_head.state_dict(), "vq": {"last_used": last_used}, "optimizer": {"siglip": opt_siglip.state_dict(), "vq": opt_vq.state_dict()},
                "meta": {"stage": "tokenizer", "siglip_steps": t.siglip_steps, "vq_steps": t.vq_steps}},
                keep_last=t.keep_last)
        if stopped:
            break
    tracker.close()
    report: dict = {}
    if rank == 0 and not stopped:
        report = write_tokenizer(model.cpu().eval(), dcfg, pairs, out, {**info, "seconds": round(time.time() - t0, 2)})
    if _distributed():
        dist.barrier()
    return report


def write_tokenizer(model, dcfg, pairs, out: Path, info: dict) -> dict:
    """The released layout + codebook_report.json (fit-codebook's figures, the shape probe, the training's)."""
    fingerprint = save_image_tokenizer(model, out)
    pixels = list(pairs.pixels)
    ids = torch.cat([i.flatten() for i in model.encode_images(pixels, dcfg.image_tokenizer.batch_size)])
    report = {"images": len(pixels), "fit_usage": usage_stats(ids, model.codebook_size), "fingerprint": fingerprint,
              "vit": "tokenizer train", "train": info}
    report.update(codebook_report(model, dcfg, pixels, Path(dcfg.raw_dir) / "val"))
    report.update(shape_probe(model, dcfg))
    (out / "codebook_report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    vu = report.get("val_usage", report["fit_usage"])
    print(f"tokenizer train: {info['pairs']} pairs, siglip loss {info.get('siglip_loss', 'n/a')}, vq loss "
          f"{info.get('vq_loss', 'n/a')}; val perplexity {vu['perplexity']}, dead {vu['dead']}, detect-from-codes "
          f"{report.get('val_shapes_detect_from_codes', 'n/a')}, shape-kind probe {report.get('probe_shape_kind', 'n/a')}"
          f" (centre code {report.get('probe_shape_kind_centre_code', 'n/a')}) -> {out} in {info['seconds']}s")
    return report
