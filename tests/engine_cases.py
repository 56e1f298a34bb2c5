"""Shared pieces of the engine tests: a tiny config, a fixed batch, a deterministic loss, a single-process reference.

The loss is plain cross entropy of the logits against fixed random targets plus the model's aux loss (the diffusion
objective lives elsewhere; the engines must not depend on it).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, SEQ = 4, 16


def make_cfg(engine="native", tp=1, ep=1, sp=False, zero=2, precision="fp32", extra=(), etp=1):
    from training.config import load_config
    return load_config(ROOT / "configs/model/tiny.yaml", [
        f"train.engine={engine}", f"parallel.tensor={tp}", f"parallel.expert={ep}", f"parallel.expert_tensor={etp}",
        f"parallel.sequence_parallel={str(sp).lower()}", f"parallel.zero_stage={zero}",
        f"train.precision={precision}", f"train.global_batch_size={GLOBAL_BATCH}", "train.micro_batch_size=2",
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


def reference(cfg, steps: int = 2) -> dict:
    """Single process, no engine: the independent reference for every layout."""
    from training.model import build_model
    model = build_model(cfg.model, "cpu", seed=cfg.train.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith(".bias")]
    plain = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    losses, norms = [], []
    for s in range(steps):
        ids, tgt = batch(cfg, s)
        loss = loss_fn(model, ids, tgt)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms, "state": {k: v.clone() for k, v in model.state_dict().items()}}


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
            engine.backward(loss)
            total += float(loss)
        out = engine.step(cfg.train.lr)
        losses.append(float(engine.all_reduce_dp(torch.tensor(total), "mean")))
        norms.append(out["grad_norm"])
    return {"loss": losses, "grad_norm": norms}
