"""The device kernels of the one-shot GPU check (bench/gpu_check.py, part 1: the unit subset on the device):
the model's forward + backward under bf16 autocast, FlexAttention against dense SDPA, torch._grouped_mm against the
per-expert loop. Each returns {"name", "ok", ...figures}."""
from __future__ import annotations

import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/model/tiny.yaml"


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _rel(a, b) -> float:
    """max |a - b| / max |b|: a scale-free error for tensors of any magnitude."""
    return _max_diff(a, b) / max(float(b.float().abs().max()), 1e-30)


def _all_finite(d: dict) -> bool:
    return all(math.isfinite(v) for v in d.values() if isinstance(v, float))


# ---- 1. unit subset on the device -------------------------------------------------------------------------------
def check_model_fwd_bwd(dev: torch.device) -> dict:
    from training.config import load_config
    from training.diffusion.masks import training_mask, use_flex
    from training.model import build_model

    cfg = load_config(TINY).model
    model = build_model(cfg, dev, seed=0)
    g = torch.Generator().manual_seed(0)
    length, block = 128, 16
    ids = torch.randint(0, cfg.vocab_size, (2, 2 * length), generator=g).to(dev)  # x_t || x_0
    doc = torch.zeros(2, length, dtype=torch.long)
    doc[1, 70:] = 1  # two documents packed in the second row
    pos = torch.cat([torch.arange(length)] * 2)[None].expand(2, -1).to(dev)
    mask = training_mask(doc.to(dev), block, cfg.attention)
    bf16 = dev.type == "cuda"
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(input_ids=ids, position_ids=pos, attention_mask=mask, logits_to_keep=length)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):  # the docstring says fp32 logits
        router_dtype = model.moe_layers()[0].gate(torch.randn(4, cfg.hidden_size, device=dev))[3].dtype
    loss = out.logits.logsumexp(-1).mean() + out.aux_loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    finite = all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads.values())
    zero = [n for n, gr in grads.items() if gr is not None and not gr.abs().sum()
            and not n.endswith("lm_head.weight") and "word_embeddings" not in n]
    norm = float(torch.sqrt(sum(gr.double().pow(2).sum() for gr in grads.values() if gr is not None)))
    return {"ok": finite and not zero and math.isfinite(loss.item()), "precision": "bf16" if bf16 else "fp32",
            "flex": use_flex(cfg.attention, dev), "loss": loss.item(), "grad_norm": norm,
            "zero_grad_params": zero, "router_logits_dtype_under_autocast": str(router_dtype).replace("torch.", "")}


def check_flex_vs_dense(dev: torch.device) -> dict:
    from training.diffusion.masks import dense_training_mask, flex_training_mask
    from training.model.attention import attend

    cuda = dev.type == "cuda"
    b, h, hkv, d, length, block = (2, 16, 4, 128, 1024, 32) if cuda else (1, 4, 2, 16, 64, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    tol = 2e-2 if cuda else 1e-4
    g = torch.Generator().manual_seed(0)
    doc = torch.zeros(b, length, dtype=torch.long)
    doc[:, length // 3:] = 1
    doc[:, 2 * length // 3 + 5:] = 2  # three packed documents, boundaries inside blocks
    out = {"ok": True, "dtype": str(dtype).replace("torch.", ""), "backward": cuda, "tolerance_rel": tol}
    for case, bs in (("block_diffusion", block), ("mdlm", length)):
        n = 2 * length if bs < length else length
        q = torch.randn(b, h, n, d, generator=g).to(dev, dtype)
        k, v = (torch.randn(b, hkv, n, d, generator=g).to(dev, dtype) for _ in range(2))
        dy = torch.randn(b, h, n, d, generator=g).to(dev, dtype)
        res = {}
        for path, mask in (("flex", flex_training_mask(doc.to(dev), bs)),
                           ("dense", dense_training_mask(doc.to(dev), bs))):
            qkv = [t.clone().requires_grad_(cuda) for t in (q, k, v)]
            with torch.set_grad_enabled(cuda):
                o = attend(*qkv, mask)
                if cuda:
                    o.backward(dy)
            res[path] = [o.detach(), *(t.grad for t in qkv if cuda)]
        names = ["out", "dq", "dk", "dv"] if cuda else ["out"]
        for i, name in enumerate(names):
            out[f"{case}_{name}_max_abs_diff"] = _max_diff(res["flex"][i], res["dense"][i])
            rel = _rel(res["flex"][i], res["dense"][i])
            out[f"{case}_{name}_rel_diff"] = rel
            out["ok"] &= rel <= tol
    return out


def check_grouped_mm(dev: torch.device) -> dict:
    from training.model.moe import Experts

    if not hasattr(torch, "_grouped_mm"):
        return {"ok": False, "error": "this torch has no torch._grouped_mm"}
    cuda = dev.type == "cuda"
    e, hid, inter, tokens = (32, 2048, 512, 4096) if cuda else (8, 64, 32, 96)
    dtype = torch.bfloat16 if cuda else torch.float32
    tol = 2e-2 if cuda else 1e-5
    g = torch.Generator().manual_seed(0)
    experts = Experts(e, hid, inter).to(dev)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * hid ** -0.5)
    counts = torch.bincount(torch.randint(0, e, (tokens,), generator=g), minlength=e)
    counts[1] = 0  # an expert with no tokens (an empty group) must work too
    counts = counts.tolist()
    x = torch.randn(sum(counts), hid, generator=g).to(dev, dtype)
    dy = torch.randn(x.shape, generator=g).to(dev, dtype)
    res, calls, real = {}, [0], torch._grouped_mm

    def counting(*a, **k):  # to know that "auto" really took the grouped kernel (the model may fall back)
        calls[0] += 1
        return real(*a, **k)

    torch._grouped_mm = counting
    try:
        for mode in ("auto", "off"):
            experts.grouped_gemm = mode
            experts.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            y = experts(xi, counts)
            y.backward(dy)
            res[mode] = [y.detach(), xi.grad, experts.gate_proj.grad, experts.up_proj.grad, experts.down_proj.grad]
            if mode == "auto":
                used, calls[0] = calls[0] > 0, 0
    finally:
        torch._grouped_mm = real
    old_gpu = cuda and torch.cuda.get_device_capability(dev) < (9, 0)  # the model keeps the loop there on purpose
    out = {"ok": (used or old_gpu) and calls[0] == 0, "dtype": str(dtype).replace("torch.", ""),
           "tolerance_rel": tol, "rows": sum(counts), "grouped_mm_used": used, "grouped_mm_calls_when_off": calls[0]}
    for i, name in enumerate(["out", "dx", "d_gate_proj", "d_up_proj", "d_down_proj"]):
        out[f"{name}_max_abs_diff"] = _max_diff(res["auto"][i], res["off"][i])
        rel = _rel(res["auto"][i], res["off"][i])
        out[f"{name}_rel_diff"] = rel
        out["ok"] &= rel <= tol
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):  # what the model feeds it: fp32 rows
        for mode in ("auto", "off"):
            experts.grouped_gemm = mode
            out[f"autocast_out_dtype_{mode}"] = str(experts(x.float(), counts).dtype).replace("torch.", "")
    return out
