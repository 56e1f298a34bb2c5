"""`elbo`: the masked-diffusion negative ELBO per token (and the perplexity bound exp(NELBO)) on held-out sequences,
overall and split into text and image tokens, with Monte Carlo and across-item standard errors.

Baseline: the uniform model's bound, log V nats per token (ppl V), V = model vocabulary; a useful model is below it.
Data parallel: every rank scores items i with i % world == rank and the additive statistics are all-reduced, so the
numbers equal a single-process run (draws are seeded per item).
"""
from __future__ import annotations

import math

from evals.context import EvalContext, HeldOutTask, TaskResult
from evals.likelihood import all_reduce_sums, nelbo_draws, nelbo_sums, summarize
from training.diffusion.schedule import final_block_size


def elbo_block_size(ctx: EvalContext) -> int:
    """eval.elbo_block_size, or the block size training ends with (last entry of diffusion.block_schedule)."""
    if ctx.ecfg.elbo_block_size >= 0:
        return int(ctx.ecfg.elbo_block_size)
    return final_block_size(ctx.cfg.diffusion.block_schedule)


class ElboTask(HeldOutTask):
    name = "elbo"
    distributed = True
    items_of = "elbo"
    nothing = "no held-out sequences for elbo"

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        e = ctx.ecfg
        mine = [it for i, it in enumerate(items) if i % ctx.world == ctx.rank]
        draws = nelbo_draws(ctx.model, mine, mc=e.elbo_mc, estimator=e.elbo_estimator, sampling=e.elbo_sampling,
                            eps=e.elbo_eps, block_size=elbo_block_size(ctx), mask_id=ctx.specials.mask,
                            batch_size=e.batch_size, seed=e.seed, device=ctx.device,
                            progress=e.progress and ctx.is_main, desc="elbo")
        stats = summarize(all_reduce_sums(nelbo_sums(draws, mine)))
        vocab = int(ctx.cfg.model.vocab_size)
        scores = {**stats, "items": float(len(items)), "mc": float(e.elbo_mc)}
        baselines = {"nelbo_per_token": math.log(vocab), "ppl_bound": float(vocab)}
        res = TaskResult(self.name, scores=scores, baselines=baselines)
        res.tables["estimator"] = [{"estimator": e.elbo_estimator, "sampling": e.elbo_sampling, "mc": e.elbo_mc,
                                    "block_size": elbo_block_size(ctx), "items": len(items)}]
        return res
