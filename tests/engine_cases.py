"""Shared pieces of the engine tests: a tiny config, a fixed batch, a deterministic loss, a single-process reference.

Two losses: plain cross entropy of the full logits against fixed random targets plus the model's aux loss (the
engines' own contract, no objective involved), and the block-diffusion objective itself (`diffusion_loss`: x_t || x_0,
block size 4 < length 16, packed documents, image tokens, "token" normalisation over the global batch, CAP entropy,
a head chunk smaller than the masked rows), whose hidden-state selection and LM head cross sequence/tensor parallel.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SEQ, MICRO = 4, 16, 2
# The diffusion step's objective settings (on top of configs/model/tiny.yaml's diffusion section).
DIFFUSION = {"block_schedule": [[0, 4]], "normalize": "token", "cap_lambda": 2.0, "loss_chunk": 7,
             "loss_weight_image": 0.5, "mask_low": 0.2}
SPECIALS = {"mask": 1}


def make_cfg(engine="native", tp=1, ep=1, sp=False, zero=2, precision="fp32", extra=(), etp=1):
    from training.config import load_config
    return load_config(ROOT / "configs/model/tiny.yaml", [
        f"train.engine={engine}", f"parallel.tensor={tp}", f"parallel.expert={ep}", f"parallel.expert_tensor={etp}",
        f"parallel.sequence_parallel={str(sp).lower()}", f"parallel.zero_stage={zero}",
        f"train.precision={precision}", f"train.global_batch_size={GLOBAL_BATCH}",
        f"train.micro_batch_size={MICRO}",
        "train.seed=7", "train.grad_clip=1.0", "train.lr=1e-3", "train.weight_decay=0.1",
        "model.aux_loss_coeff=0.01", "model.z_loss_coeff=0.001", *extra])


def batch(cfg, step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, cfg.model.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    tgt = torch.randint(0, cfg.model.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    return ids, tgt


def loss_fn(model, ids, tgt):
    out = model(input_ids=ids)
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), tgt.reshape(-1)) + out.aux_loss


def diffusion_batch(cfg, step: int = 0):
    """The step's corrupted global batch: one generator draws every mask and t, so each layout slices the very
    masks a single process uses. -> (batch, diffusion config).

    CAP's entropy term only counts masked positions predicted right, and a random model predicts none: the clean
    tokens at the masked positions of each row's last block are set to the initial model's predictions there
    (x_t queries never see the x_0 stream of their own block, so this changes no prediction). The diffusion step
    is therefore the first step of a run."""
    from training.diffusion import corrupt
    from training.diffusion.masks import dense_training_mask
    from training.model import build_model
    g = torch.Generator().manual_seed(300 + step)
    ids = torch.randint(3, cfg.model.image_token_offset, (GLOBAL_BATCH, SEQ), generator=g)
    ids[1, 8:] = cfg.model.image_token_offset + torch.randint(0, 256, (SEQ - 8,), generator=g)
    doc = torch.zeros_like(ids)
    doc[0, 10:], doc[2, 5:] = 1, 1  # packed documents: positions restart, attention stays inside each
    pos = torch.arange(SEQ).repeat(GLOBAL_BATCH, 1)
    pos[0, 10:] -= 10
    pos[2, 5:] -= 5
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    is_image[1, 8:] = True
    maskable = torch.ones_like(is_image)
    maskable[:, :2] = False  # a prompt that is never masked
    dcfg = dataclasses.replace(cfg.diffusion, **DIFFUSION)
    batch = corrupt({"input_ids": ids, "doc_ids": doc, "position_ids": pos, "is_image": is_image,
                     "maskable": maskable}, dcfg, step, SPECIALS, g)
    bs = batch["block_size"]
    with torch.no_grad():
        out = build_model(cfg.model, "cpu", seed=cfg.train.seed)(
            input_ids=torch.cat([batch["x_t"], ids], 1), position_ids=torch.cat([pos, pos], 1),
            attention_mask=dense_training_mask(doc, bs))
    last = batch["masked"].clone()
    last[:, :SEQ - bs] = False
    batch["input_ids"] = torch.where(last, out.logits[:, :SEQ].argmax(-1), ids)
    return batch, dcfg


def diffusion_micro_steps(model, backward, cfg, step: int = 0, dp_rank: int = 0, dp_size: int = 1,
                          autocast=contextlib.nullcontext) -> tuple[float, float]:
    """One step's forwards/backwards of `diffusion_loss` on this rank's micro-batches of MICRO rows, normalised as
    the trainer does (the global masked count / (DP x accumulation)). -> (loss of this rank, correct masked
    predictions of this rank). Every layout (and the reference) runs the same micro-batches: rows {0, 1}, {2, 3}."""
    from training.diffusion import diffusion_loss
    noised, dcfg = diffusion_batch(cfg, step)
    per = GLOBAL_BATCH // dp_size
    accum = per // MICRO
    denom = noised["counted"].sum().float().clamp(min=1) / (dp_size * accum)
    total, correct = 0.0, 0.0
    for m in range(accum):
        lo = dp_rank * per + m * MICRO
        micro = {k: v[lo:lo + MICRO] if torch.is_tensor(v) and v.dim() and v.shape[0] == GLOBAL_BATCH else v
                 for k, v in noised.items()}
        with autocast():
            loss, metrics = diffusion_loss(model, micro, dcfg, step, SPECIALS, denom=denom)
        backward(loss / accum)
        total += float(loss.detach()) / accum
        correct += float(metrics["acc_masked"] * metrics["n_masked"])
    return total, correct


def reference(cfg, steps: int = 2, diffusion: bool = False) -> dict:
    """Single process, no engine: the independent reference for every layout. With `diffusion`, one step of the
    diffusion objective first (its loss and norm lead the lists; "correct": its right masked predictions), then
    `steps` CE steps."""
    from training.engines.lora import lora_model
    model = lora_model(cfg.model, "cpu", seed=cfg.train.seed)  # (the plain model when model.lora.rank = 0)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2 and not n.endswith(".bias")]
    plain = [p for n, p in trainable if not (p.ndim >= 2 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    losses, norms, correct = [], [], []
    for s in range(-1 if diffusion else 0, steps):
        if s < 0:
            loss, right = diffusion_micro_steps(model, torch.Tensor.backward, cfg)
            losses.append(loss)
            correct.append(right)
        else:
            ids, tgt = batch(cfg, s)
            loss = loss_fn(model, ids, tgt)
            loss.backward()
            losses.append(loss.item())
        norms.append(float(torch.nn.utils.clip_grad_norm_([p for _, p in trainable], cfg.train.grad_clip)))
        opt.step()
        opt.zero_grad()
    return {"loss": losses, "grad_norm": norms, "correct": correct,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def run_engine_steps(engine, cfg, steps: int = 2, start: int = 0) -> dict:
    """Train `steps` steps on this rank's data-parallel slice of the fixed batches; mean loss over DP ranks."""
    w = engine.world
    per = GLOBAL_BATCH // w.dp_size
    accum = engine.global_batch_accum()
    micro = per // accum
    losses, norms = [], []
    for s in range(start, start + steps):
        ids, tgt = batch(cfg, s)
        ids, tgt = ids[w.dp_rank * per:(w.dp_rank + 1) * per], tgt[w.dp_rank * per:(w.dp_rank + 1) * per]
        total = 0.0
        for m in range(accum):
            sl = slice(m * micro, (m + 1) * micro)
            with engine.autocast():
                loss = loss_fn(engine.model, ids[sl], tgt[sl]) / accum
            engine.backward(loss, last_microbatch=m == accum - 1)
            total += float(loss)
        out = engine.step(cfg.train.lr)
        losses.append(float(engine.all_reduce_dp(torch.tensor(total), "mean")))
        norms.append(out["grad_norm"])
    return {"loss": losses, "grad_norm": norms}


def run_engine_diffusion_step(engine, cfg) -> dict:
    """One optimizer step of the diffusion objective (before `run_engine_steps`); loss mean and correct-prediction
    count sum over DP ranks (each rank's share of the global batch), as the reference reports them."""
    w = engine.world
    loss, correct = diffusion_micro_steps(engine.model, engine.backward, cfg, 0, w.dp_rank, w.dp_size,
                                          engine.autocast)
    out = engine.step(cfg.train.lr)
    return {"loss": float(engine.all_reduce_dp(torch.tensor(loss), "mean")),
            "correct": float(engine.all_reduce_dp(torch.tensor(correct))), "grad_norm": out["grad_norm"]}
