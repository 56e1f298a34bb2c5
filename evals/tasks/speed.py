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

from evals.context import EvalContext, TaskResult, missing


def _timed(fn, repeats: int):
    fn()  # warm-up (allocations, lazy init)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


class SpeedTask:
    name = "speed"
    distributed = False

    def run(self, ctx: EvalContext) -> TaskResult:
        why = missing(ctx, "model", "specials", "data")
        if why:
            return TaskResult.skipped(self.name, why)
        from training.diffusion.samplers import generate_text

        t0 = time.time()
        d, e = ctx.cfg.diffusion, ctx.ecfg
        scores: dict[str, float] = {}
        table = []
        prompts = [it.prompt for it in (ctx.data.vqa or ctx.data.caption)[:1]]
        if prompts:
            # No EOS early stop: every one of gen_length positions is decoded, so the counts are exact.
            res, secs = _timed(lambda: generate_text(
                ctx.model, prompts, mask_id=ctx.specials.mask, eos_id=None, gen_length=e.speed_gen_length,
                block_length=d.sample_block_length, steps=d.sample_steps, threshold=d.sample_threshold,
                strategy=d.sample_strategy, temperature=d.sample_temperature, device=ctx.device), e.speed_repeats)
            scores.update({"text/forwards_per_token": res.nfe / e.speed_gen_length,
                           "text/tokens_per_forward": e.speed_gen_length / res.nfe,
                           "text/nfe": float(res.nfe), "text/tokens_per_s": e.speed_gen_length / secs,
                           "text/seconds": secs})
            table.append({"stage": "text", "nfe": res.nfe, "tokens": e.speed_gen_length,
                          "tokens_per_forward": round(e.speed_gen_length / res.nfe, 3), "seconds": round(secs, 4)})
        if ctx.data.t2i:
            from evals.tasks.t2i import generate_codes

            item = ctx.data.t2i[0]
            (codes, nfe), secs = _timed(lambda: generate_codes(ctx, item), e.speed_repeats)
            n_tok = item.grid[0] * item.grid[1]
            scores.update({"image/nfe": float(nfe), "image/tokens_per_forward": n_tok / nfe,
                           "image/token_seconds": secs})
            table.append({"stage": "image tokens", "nfe": nfe, "tokens": n_tok,
                          "tokens_per_forward": round(n_tok / nfe, 3), "seconds": round(secs, 4)})
            for name, decode in ctx.decoders.items():
                _, dsecs = _timed(lambda: decode(codes[None]), e.speed_repeats)
                scores[f"{name}/decode_seconds"] = dsecs
                scores[f"{name}/seconds_per_image"] = secs + dsecs
                table.append({"stage": f"decode ({name})", "nfe": "", "tokens": "", "tokens_per_forward": "",
                              "seconds": round(dsecs, 4)})
        if not scores:
            return TaskResult.skipped(self.name, "no prompts to time (held-out vqa/caption/t2i items are empty)")
        baselines = {"text/forwards_per_token": 1.0, "text/tokens_per_forward": 1.0,
                     "fixed_schedule/forwards_per_token": d.sample_steps / d.sample_block_length
                     if d.sample_steps <= d.sample_block_length else 1.0}
        res = TaskResult(self.name, scores=scores, baselines=baselines, seconds=time.time() - t0)
        res.tables["stages"] = table
        res.tables["settings"] = [{"block_length": d.sample_block_length, "steps": d.sample_steps,
                                   "image_steps": d.sample_image_steps, "threshold": d.sample_threshold,
                                   "strategy": d.sample_strategy, "device": str(ctx.device),
                                   "threads": torch.get_num_threads()}]
        return res
