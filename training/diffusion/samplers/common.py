"""Pieces every diffusion sampler shares: token proposal with a confidence score, and the acceptance rule.

Confidence strategies (LLaDA2.0 / SPRINT `remasking`):
  low_confidence: probability of the proposed token
  top_k_margin:   p(top-1) - p(top-2)
  neg_entropy:    sum p log p  (higher = sharper)
Acceptance per step (dFactory `generate`): every masked token whose probability exceeds the threshold, and at least
the scheduled k = ceil(masked left in the block / steps left) best by the strategy's score, so a block always finishes
within its step budget and confident logits finish it in fewer forward passes.
"""
from __future__ import annotations

import torch

STRATEGIES = ("low_confidence", "top_k_margin", "neg_entropy")


def propose(logits: torch.Tensor, strategy: str = "low_confidence", temperature: float = 0.0,
            generator: torch.Generator | None = None):
    """logits [..., V] -> (tokens [...], prob of the token [...], score [...]) under the strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sampler strategy={strategy} is not known: {' | '.join(STRATEGIES)}")
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        # Gumbel-max on logits / T: an exact categorical draw, batched over all positions.
        u = torch.rand(logits.shape, device=logits.device, generator=generator).clamp_(1e-10, 1.0)
        tokens = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    p = probs.gather(-1, tokens[..., None]).squeeze(-1)
    if strategy == "low_confidence":
        score = p
    elif strategy == "top_k_margin":
        top2 = probs.topk(2, dim=-1).values
        score = top2[..., 0] - top2[..., 1]
    else:
        score = (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    return tokens, p, score


def scheduled_count(masked: torch.Tensor, steps_left: int) -> torch.Tensor:
    """k per row = ceil(masked left / steps left): finishes the block in the remaining steps."""
    remaining = masked.sum(-1)
    return (remaining + steps_left - 1) // max(steps_left, 1)


def accept(masked: torch.Tensor, p: torch.Tensor, score: torch.Tensor, k: torch.Tensor,
           threshold: float) -> torch.Tensor:
    """masked/p/score [R, Lb], k [R] -> bool [R, Lb]: top-k masked positions by score, plus all with p > threshold."""
    score = score.masked_fill(~masked, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    chosen = (rank < k[:, None]) | (p > threshold)
    return chosen & masked


def cfg_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Logit-space CFG l_u + s (l_c - l_u); rescale (sglang-omni) pulls the guided logits' std back to the
    conditional one's: g <- r * g * std(l_c) / std(g) + (1 - r) * g, std over the vocabulary."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        ratio = cond.std(-1, keepdim=True) / guided.std(-1, keepdim=True).clamp_min(1e-6)
        guided = rescale * guided * ratio + (1.0 - rescale) * guided
    return guided


def edit_guidance(cond: torch.Tensor, no_text: torch.Tensor, no_image: torch.Tensor, text_scale: float,
                  image_scale: float) -> torch.Tensor:
    """Three-way editing guidance (sglang-omni): l_nt + s_t (l_c - l_nt) + s_i (l_nt - l_ni)."""
    return no_text + text_scale * (cond - no_text) + image_scale * (no_text - no_image)
