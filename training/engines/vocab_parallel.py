"""The LM head split by vocabulary rows over the tensor-parallel group, and its exact cross-entropy.

Under TP a replicated head gives every TP rank the full [N, V] logits of the masked rows (and a full V x H gradient
to reduce): at V = 173k that is the largest activation of a step. Split by vocab rows (megatron's output layer), each
TP rank computes [N, V/tp] and the cross-entropy combines per-row statistics over the TP group (megatron-core's
`vocab_parallel_cross_entropy` math: a max all-reduce, then sums of exp and of the target logit), so no rank ever
holds a full row of logits. Equal to the replicated head in value and gradient:

    ce       = log sum_v exp(z_v - m) + m - z_target             m = max_v z_v (all ranks)
    correct  = z_target == m and no id < target attains m        (torch.argmax returns the first maximum)
    entropy  = -sum_v p_v log p_v                                p = softmax(z)
    d/dz_v   = g_ce (p_v - [v == target]) - g_ent (p_v log p_v + p_v entropy)

The backward needs only this rank's softmax slice (saved, as megatron's), so it is local; the input rows enter the
TP region with `copy_to` (their gradient is a sum over the vocab slices). `forward` still returns full logits (an
all-gather over the vocab dim) for the callers that want them (generate, evals, a plain CE).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _VocabParallelCE(torch.autograd.Function):
    """logits [N, V/tp] (fp32, this rank's vocab slice) -> (ce [N], correct [N] bool, entropy [N] or [0])."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group, with_entropy):
        n_local = logits.shape[-1]
        m = logits.max(-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        ids = torch.arange(vocab_start, vocab_start + n_local, device=logits.device)
        mine = (target >= vocab_start) & (target < vocab_start + n_local)
        local_t = (target - vocab_start).clamp(0, n_local - 1)
        z_t = logits.gather(-1, local_t[:, None]).squeeze(-1) * mine
        p = (logits - m[:, None]).exp_()
        # [sum exp, target logit, ids below the target attaining the maximum]: one sum over the group
        sums = torch.stack([p.sum(-1), z_t, ((logits == m[:, None]) & (ids < target[:, None])).sum(-1).float()])
        dist.all_reduce(sums, group=group)
        sum_exp, z_t, below = sums.unbind()
        ce = sum_exp.log() + m - z_t
        correct = (z_t == m) & (below == 0)
        p.div_(sum_exp[:, None])
        entropy = logits.new_zeros(0)
        if with_entropy:
            entropy = -torch.xlogy(p, p).sum(-1)
            dist.all_reduce(entropy, group=group)
        ctx.save_for_backward(p, local_t, mine, entropy)
        ctx.with_entropy = with_entropy
        ctx.mark_non_differentiable(correct)
        return ce, correct, entropy

    @staticmethod
    def backward(ctx, g_ce, _g_correct, g_ent):
        p, local_t, mine, entropy = ctx.saved_tensors
        grad = p * g_ce[:, None]
        if ctx.with_entropy and g_ent is not None:
            grad -= (torch.xlogy(p, p) + p * entropy[:, None]) * g_ent[:, None]
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_t] -= g_ce * mine
        return grad, None, None, None, None


class VocabParallelHead(nn.Module):
    """`lm_head` holding vocab rows [vocab_start, vocab_start + V/tp) of the full [V, H] weight (same name:
    `weight`). The loss calls `chunk_ce` (a plain function of the weight, not a module call, so the chunks can be
    recomputed one by one); `forward` returns the full logits."""

    def __init__(self, weight: torch.Tensor, comm, vocab_start: int):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.comm, self.vocab_start = comm, vocab_start

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.comm.gather(F.linear(self.comm.copy_to(h), self.weight), -1)

    def chunk_ce(self, weight: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor, with_entropy: bool):
        """The objective's per-chunk head: (ce, argmax == target, predictive entropy if asked) of rows hidden [N, H],
        as `objective._head_ce` computes them from full logits."""
        logits = F.linear(self.comm.copy_to(hidden), weight).float()
        return _VocabParallelCE.apply(logits, target, self.vocab_start, self.comm.group, with_entropy)


def shard_lm_head(model, specs, tp_rank: int, tp_size: int, comm) -> None:
    """Replace `model.lm_head` by this TP rank's vocab rows; its ShardSpec describes the split (checkpoints and HF
    import/export reshard it like any row-split tensor). A head tied to the embeddings stays replicated (the
    embedding would have to be vocab-parallel too)."""
    if model.config.tie_word_embeddings:
        return
    w = model.lm_head.weight
    vocab = w.shape[0]
    if vocab % tp_size:
        raise ValueError(f"model.vocab_size={vocab} is not divisible by parallel.tensor={tp_size}: the LM head is "
                         "split by vocab rows under TP; pad the vocabulary to a multiple of parallel.tensor")
    n = vocab // tp_size
    local = (torch.empty((n, w.shape[1]), device="meta", dtype=w.dtype) if w.device.type == "meta"
             else w.detach()[tp_rank * n:(tp_rank + 1) * n].clone())
    model.lm_head = VocabParallelHead(local, comm, tp_rank * n)
    spec = specs["lm_head.weight"]
    spec.pieces, spec.dim, spec.kind = [(0, tp_rank * n, n)], 0, "tp"
