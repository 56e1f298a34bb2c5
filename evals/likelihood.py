"""Monte Carlo estimates of the masked-diffusion negative ELBO (NELBO), the one likelihood core of the harness.

For a sequence x with maskable positions S (|S| = n), two unbiased estimators of the same bound
    NELBO(x) = E_t [ 1/t * sum_{i masked} -log p(x_i | x_t) ],  each i in S masked independently with prob t
are offered (they are equal in expectation for any loss h(mask) with h(empty) = 0, because
int_0^1 C(n,l) t^(l-1) (1-t)^(n-l) dt = 1/l):
  t (MDLM):   draw t, mask Bernoulli(t), weight 1/t
  l (LLaDA):  draw l in {1..n}, mask exactly l positions uniformly, weight n/l   (lower variance: no empty masks)
The M draws per sequence use stratified units (j + u_j)/M, antithetic pairs (u, 1-u), or iid units. Draws are
seeded by (seed, item key) alone, so a data-parallel run that splits items over ranks makes exactly the draws of a
single-process run.

The forward is the training one: x_t only under a document mask (block size >= L, MDLM), or x_t || x_0 under the
block-diffusion mask, so the bound is the one the model was trained on (BD3-LM: a sum of per-block NELBOs given
clean earlier blocks, still estimated without bias by one t shared over the blocks).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training.accelerator import all_reduce_host
from training.diffusion.masks import training_inputs


@dataclass
class LikelihoodItem:
    """One sequence to score: ids [L], maskable [L] (the positions whose likelihood is estimated), is_image [L]."""
    ids: torch.Tensor
    maskable: torch.Tensor
    is_image: torch.Tensor
    key: int  # seeds its Monte Carlo draws (the held-out index; identical across ranks and runs)


def item_generator(seed: int, key: int, salt: str = "") -> torch.Generator:
    h = hashlib.sha256(f"{seed}/{key}/{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") % (2**63))


def units(mc: int, sampling: str, generator: torch.Generator) -> torch.Tensor:
    """mc numbers in [0, 1), each marginally uniform; stratified/antithetic ones are negatively correlated."""
    if sampling == "stratified":
        return (torch.arange(mc, dtype=torch.float64) + torch.rand(mc, generator=generator, dtype=torch.float64)) / mc
    if sampling == "antithetic":
        if mc % 2:
            raise ValueError(f"antithetic sampling needs an even number of draws, got {mc}")
        u = torch.rand(mc // 2, generator=generator, dtype=torch.float64)
        return torch.cat([u, 1.0 - u])
    if sampling == "iid":
        return torch.rand(mc, generator=generator, dtype=torch.float64)
    raise ValueError(f"sampling={sampling} is not known: stratified | antithetic | iid")


def draw_masks(maskable: torch.Tensor, mc: int, estimator: str, sampling: str, eps: float,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (masks bool [mc, L] within `maskable`, weights float64 [mc]) for one sequence."""
    maskable = maskable.bool().cpu()
    n = int(maskable.sum())
    u = units(mc, sampling, generator)
    if n == 0:
        return torch.zeros((mc, maskable.shape[0]), dtype=torch.bool), torch.zeros(mc, dtype=torch.float64)
    noise = torch.rand((mc, maskable.shape[0]), generator=generator)
    if estimator == "t":
        t = u.clamp(min=eps)
        return (noise < t[:, None].float()) & maskable, 1.0 / t
    if estimator == "l":
        length = (u * n).floor().long().clamp(0, n - 1) + 1  # l in {1..n}, uniform when u is
        # Exactly l positions: the l smallest random scores among the maskable ones (one sort, no loop).
        score = noise.masked_fill(~maskable, 2.0)
        rank = score.argsort(dim=1).argsort(dim=1)
        return (rank < length[:, None]) & maskable, n / length.double()
    raise ValueError(f"estimator={estimator} is not known: t | l")


def _forward_rows(model, ids, masked, maskable_len, block_size: int, mask_id: int, device):
    """ids/masked [R, Lp] (rows right-padded; maskable_len [R] real lengths) -> per-position CE [R, Lp] (0 where not
    masked), from one forward in the training layout."""
    rows, length = ids.shape
    pos = torch.arange(length).expand(rows, length)
    real = pos < maskable_len[:, None]
    doc = torch.where(real, torch.zeros_like(pos), torch.ones_like(pos))  # padding is its own document
    x_t = torch.where(masked, torch.full_like(ids, mask_id), ids)
    attention = getattr(getattr(model, "config", None), "attention", "auto")
    inp, positions, attn = training_inputs(x_t.to(device), ids.to(device), pos.to(device), doc.to(device),
                                           block_size, attention)
    out = model(input_ids=inp, position_ids=positions, attention_mask=attn)
    logits = out.logits[:, :length]
    ce = torch.zeros((rows, length), dtype=torch.float64)
    if masked.any():
        sel = masked.to(logits.device)
        ce[masked] = F.cross_entropy(logits[sel].float(), ids.to(logits.device)[sel], reduction="none").double().cpu()
    return ce


@torch.no_grad()
def nelbo_draws(model, items: list[LikelihoodItem], *, mc: int, estimator: str, sampling: str, eps: float,
                block_size: int, mask_id: int, batch_size: int, seed: int, device="cpu", salt: str = "",
                progress: bool = False, desc: str = "elbo") -> torch.Tensor:
    """-> float64 [N, mc, 2]: per item and draw, the weighted NELBO contribution of its text and image tokens
    (sum of the two = one unbiased draw of the item's NELBO in nats)."""
    rows = []  # (item index, draw index, ids, mask, weight)
    for k, it in enumerate(items):
        masks, weights = draw_masks(it.maskable, mc, estimator, sampling, eps, item_generator(seed, it.key, salt))
        for j in range(mc):
            rows.append((k, j, masks[j], float(weights[j])))
    out = torch.zeros((len(items), mc, 2), dtype=torch.float64)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="row", leave=False)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        length = max(items[k].ids.shape[0] for k, _, _, _ in chunk)
        ids = torch.zeros((len(chunk), length), dtype=torch.long)
        masked = torch.zeros((len(chunk), length), dtype=torch.bool)
        image = torch.zeros((len(chunk), length), dtype=torch.bool)
        lens = torch.zeros(len(chunk), dtype=torch.long)
        for r, (k, _, m, _) in enumerate(chunk):  # once per row (a sequence), not per token
            n = items[k].ids.shape[0]
            ids[r, :n], masked[r, :n], image[r, :n], lens[r] = items[k].ids, m, items[k].is_image.bool(), n
        ce = _forward_rows(model, ids, masked, lens, block_size, mask_id, device)
        w = torch.tensor([c[3] for c in chunk], dtype=torch.float64)[:, None]
        text_part = (ce * (~image)).sum(1, keepdim=True) * w
        image_part = (ce * image).sum(1, keepdim=True) * w
        ki = torch.tensor([c[0] for c in chunk])
        ji = torch.tensor([c[1] for c in chunk])
        out[ki, ji] = torch.cat([text_part, image_part], 1)
        bar.update(len(chunk))
    bar.close()
    return out


def nelbo_sums(draws: torch.Tensor, items: list[LikelihoodItem]) -> dict[str, torch.Tensor]:
    """Additive statistics (safe to all-reduce over data-parallel ranks) for the per-token bound and its errors,
    for the parts total / text / image. Each value is a float64 tensor [3] (total, text, image)."""
    x = torch.stack([draws.sum(-1), draws[..., 0], draws[..., 1]], -1)  # [N, mc, 3]
    n_text = torch.tensor([float((it.maskable.bool() & ~it.is_image.bool()).sum()) for it in items], dtype=torch.float64)
    n_img = torch.tensor([float((it.maskable.bool() & it.is_image.bool()).sum()) for it in items], dtype=torch.float64)
    n = torch.stack([n_text + n_img, n_text, n_img], -1)  # [N, 3]
    mean = x.mean(1)  # per-item estimate
    mc = x.shape[1]
    var = x.var(1, unbiased=True) if mc > 1 else torch.zeros_like(mean)
    return {"x": mean.sum(0), "n": n.sum(0), "xx": (mean ** 2).sum(0), "xn": (mean * n).sum(0),
            "nn": (n ** 2).sum(0), "var_mc": (var / mc).sum(0), "items": torch.full((3,), float(len(items)),
                                                                                    dtype=torch.float64),
            "mc": torch.full((3,), float(mc), dtype=torch.float64)}


def all_reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum the statistics over the data-parallel ranks (gloo/nccl); a no-op in one process. `mc` is not summed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    keys = sorted(k for k in sums if k != "mc")
    flat = all_reduce_host(torch.stack([sums[k] for k in keys]))  # through the device under NCCL
    return {**{k: flat[i] for i, k in enumerate(keys)}, "mc": sums["mc"]}


def summarize(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-token NELBO (nats), its perplexity bound exp(.), the Monte Carlo standard error (shrinks as 1/sqrt(mc))
    and the standard error over held-out items (ratio estimator; does not shrink with mc), per part."""
    out: dict[str, float] = {}
    for p, part in enumerate(("total", "text", "image")):
        n, x = float(sums["n"][p]), float(sums["x"][p])
        count = float(sums["items"][p])
        if n == 0:
            continue
        r = x / n
        resid = float(sums["xx"][p] - 2 * r * sums["xn"][p] + r * r * sums["nn"][p])
        se_data = math.sqrt(max(resid, 0.0) * count / max(count - 1, 1)) / n
        se_mc = math.sqrt(max(float(sums["var_mc"][p]), 0.0)) / n
        prefix = "" if part == "total" else f"{part}_"
        out[f"{prefix}nelbo_per_token"] = r
        out[f"{prefix}ppl_bound"] = math.exp(min(r, 700.0))
        out[f"{prefix}se_mc"] = se_mc
        out[f"{prefix}se_data"] = se_data
        out[f"{prefix}tokens"] = n
    return out
