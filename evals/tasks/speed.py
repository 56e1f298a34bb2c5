"""`speed`: sampler cost at the configured diffusion.sample_* settings (batch 1; proposals section 5).

text:  forward passes per generated token (NFE / gen length, prefill included), tokens per forward (TPF), tokens/s
image: NFE per image (a CFG forward over both branches counts once), image tokens per forward, seconds for the
       tokens, seconds per decode for each decoder, and seconds per image = tokens + decode.
Times are the median of eval.speed_repeats runs after one warm-up; NFE/TPF counts are exact and deterministic.
Baselines: an autoregressive decoder (1 forward per token) and the fixed schedule without threshold acceptance
(sample_steps forwards per block of sample_block_length tokens).
"""
from __future__ import annotations

import statistics
import time

import torch

from evals.context import EvalContext, HeldOutTask, TaskResult


def _timed(fn, repeats: int):
    fn()  # warm-up (allocations, lazy init)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


class SpeedTask(HeldOutTask):
    name = "speed"
    nothing = "no prompts to time (held-out vqa/caption/t2i items are empty)"

    def items(self, ctx: EvalContext) -> list:
        """One text prompt (vqa, else caption) and one t2i item, whichever exist: ("text", GenItem), ("image", T2IItem)."""
        return [("text", it) for it in (ctx.data.vqa or ctx.data.caption)[:1]] + \
            [("image", it) for it in ctx.data.t2i[:1]]

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        settings = ctx.sampler
        scores: dict[str, float] = {}
        table: list[dict] = []
        for kind, item in items:
            (_time_text if kind == "text" else _time_image)(ctx, item, settings, scores, table)
        fixed = settings.steps / settings.block_length if settings.steps <= settings.block_length else 1.0
        baselines = {"text/forwards_per_token": 1.0, "text/tokens_per_forward": 1.0,
                     "fixed_schedule/forwards_per_token": fixed}
        res = TaskResult(self.name, scores=scores, baselines=baselines)
        res.tables["stages"] = table
        res.tables["settings"] = [{"block_length": settings.block_length, "steps": settings.steps,
                                   "image_steps": settings.image_steps, "threshold": settings.threshold,
                                   "strategy": settings.strategy, "device": str(ctx.device),
                                   "threads": torch.get_num_threads()}]
        return res


def _time_text(ctx: EvalContext, item, settings, scores: dict, table: list) -> None:
    from training.diffusion.samplers import generate_text

    e = ctx.ecfg
    n = e.speed_gen_length
    # No EOS early stop: every one of gen_length positions is decoded, so the counts are exact.
    res, secs = _timed(lambda: generate_text(ctx.model, [item.prompt], settings.replace(gen_length=n),
                                             mask_id=ctx.specials.mask, eos_id=None, device=ctx.device),
                       e.speed_repeats)
    scores.update({"text/forwards_per_token": res.nfe / n, "text/tokens_per_forward": n / res.nfe,
                   "text/nfe": float(res.nfe), "text/tokens_per_s": n / secs, "text/seconds": secs})
    table.append({"stage": "text", "nfe": res.nfe, "tokens": n, "tokens_per_forward": round(n / res.nfe, 3),
                  "seconds": round(secs, 4)})


def _time_image(ctx: EvalContext, item, settings, scores: dict, table: list) -> None:
    """Tokens by the t2i task's own sampler call (its guidance scale), then each decoder on them."""
    from evals.tasks.t2i import generate_codes

    (codes, nfe, _), secs = _timed(lambda: generate_codes(ctx, item), ctx.ecfg.speed_repeats)
    n_tok = item.grid[0] * item.grid[1]
    scores.update({"image/nfe": float(nfe), "image/tokens_per_forward": n_tok / nfe, "image/token_seconds": secs})
    table.append({"stage": "image tokens", "nfe": nfe, "tokens": n_tok, "tokens_per_forward": round(n_tok / nfe, 3),
                  "seconds": round(secs, 4)})
    for name, decode in ctx.decoders.items():
        _, dsecs = _timed(lambda: decode(codes[None]), ctx.ecfg.speed_repeats)
        scores[f"{name}/decode_seconds"] = dsecs
        scores[f"{name}/seconds_per_image"] = secs + dsecs
        table.append({"stage": f"decode ({name})", "nfe": "", "tokens": "", "tokens_per_forward": "",
                      "seconds": round(dsecs, 4)})
