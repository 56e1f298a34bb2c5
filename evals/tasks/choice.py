"""`choice`: multiple choice by conditional ELBO, as the LLaDA likelihood evaluations do: each candidate answer is
scored by the Monte Carlo NELBO of its tokens given the prompt (LLaDA's l-estimator: mask exactly l of the n answer
tokens, weight n/l, stratified l), and the lowest bound wins. Candidates of one question share their random draws
(common random numbers), so their difference is not swamped by Monte Carlo noise. A tie between k candidates gives
1/k credit when the right one is among them, so a model that cannot tell them apart scores exactly chance.

Baselines: chance = mean over questions of 1 / #candidates, the answer prior (always the type's most frequent right
answer) and the image-blind control (evals/controls.py), overall and per question type in the table.
"""
from __future__ import annotations

import torch

from evals.context import EvalContext, HeldOutTask, TaskResult
from evals.controls import answer_prior, blinded
from evals.likelihood import LikelihoodItem, nelbo_draws
from evals.tasks.elbo import elbo_block_size
from training.accelerator import all_reduce_host


def candidate_items(prompt: list[int], candidates: list[list[int]], key: int) -> list[LikelihoodItem]:
    out = []
    for cand in candidates:
        ids = torch.as_tensor(list(prompt) + list(cand), dtype=torch.long)
        maskable = torch.zeros(ids.shape[0], dtype=torch.bool)
        maskable[len(prompt):] = True
        out.append(LikelihoodItem(ids, maskable, torch.zeros_like(maskable), key))
    return out


def score_candidates(ctx: EvalContext, prompt, candidates, key: int, mc: int | None = None) -> torch.Tensor:
    """NELBO (nats) of each candidate given the prompt, [K] float64 (normalised per token if choice_normalize=mean)."""
    e = ctx.ecfg
    items = candidate_items(prompt, candidates, key)
    draws = nelbo_draws(ctx.model, items, mc=mc or e.choice_mc, estimator="l", sampling=e.elbo_sampling,
                        eps=e.elbo_eps, block_size=elbo_block_size(ctx), mask_id=ctx.specials.mask,
                        batch_size=e.batch_size, seed=e.seed, device=ctx.device, salt="choice")
    nelbo = draws.sum(-1).mean(1)
    if e.choice_normalize == "mean":
        nelbo = nelbo / torch.tensor([max(len(c), 1) for c in candidates], dtype=torch.float64)
    return nelbo


def credit(nelbo: torch.Tensor, answer: int, rtol: float = 1e-9) -> float:
    """1/k if the answer is among the k candidates tied for the lowest NELBO, else 0."""
    best = float(nelbo.min())
    tied = (nelbo - best).abs() <= rtol * max(abs(best), 1.0)
    return float(tied[answer]) / float(tied.sum())


class ChoiceTask(HeldOutTask):
    name = "choice"
    distributed = True
    items_of = "choice"
    nothing = "no held-out multiple-choice items"

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        from tqdm import tqdm

        qtypes = sorted({it.qtype for it in items})
        blind = ctx.ecfg.image_blind
        # Per question type: [credit, count, chance, image-blind credit]; additive, so ranks can all-reduce them.
        acc = torch.zeros(len(qtypes), 4, dtype=torch.float64)
        samples = []
        mine = [(i, it, b) for i, (it, b) in enumerate(zip(items, blinded(ctx, items) if blind else items))
                if i % ctx.world == ctx.rank]
        for i, it, b in tqdm(mine, desc="choice", disable=not (ctx.ecfg.progress and ctx.is_main), leave=False):
            nelbo = score_candidates(ctx, it.prompt, it.candidates, it.key)
            blind_credit = credit(score_candidates(ctx, b.prompt, b.candidates, b.key), b.answer) if blind else 0.0
            q = qtypes.index(it.qtype)
            acc[q] += torch.tensor([credit(nelbo, it.answer), 1.0, 1.0 / len(it.candidates), blind_credit],
                                   dtype=torch.float64)
            if len(samples) < 8 and it.labels:
                samples.append({"qtype": it.qtype, "answer": it.labels[it.answer],
                                "chosen": it.labels[int(nelbo.argmin())],
                                "nelbo": [round(float(x), 4) for x in nelbo]})
        acc = all_reduce_host(acc)  # host sums travel through the device under NCCL
        total = acc.sum(0)
        # every rank holds every item: the prior needs no reduction
        prior, prior_by_type = answer_prior([it.labels[it.answer] if it.labels else str(it.answer) for it in items],
                                            [it.qtype for it in items])
        baselines = {"accuracy": float(total[2] / total[1]), "answer_prior": prior}
        if blind:
            baselines["image_blind"] = float(total[3] / total[1])
        res = TaskResult(self.name, scores={"accuracy": float(total[0] / total[1]), "items": float(total[1])},
                         baselines=baselines, samples=samples)
        res.tables["per_type"] = [{"type": q, "accuracy": round(float(a[0] / a[1]), 4),
                                   "chance": round(float(a[2] / a[1]), 4), "answer_prior": round(prior_by_type[q], 4),
                                   **({"image_blind": round(float(a[3] / a[1]), 4)} if blind else {}), "n": int(a[1])}
                                  for q, a in zip(qtypes, acc) if a[1] > 0]
        return res
