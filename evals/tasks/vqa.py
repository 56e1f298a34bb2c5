"""`vqa` and `caption`: answers generated with the block sampler (`training.diffusion.samplers.generate_text`, the
configured diffusion.sample_* settings), decoded up to the first EOS.

vqa: exact match against the shapes answer key (`data_pipeline.shapes.score_answer`), overall and per question type.
  Baselines: chance (1 / size of the type's answer set), the answer prior (always the most frequent reference
  answer of the type in these items) and the image-blind control (evals/controls.py).
caption: word-overlap F1 (bag of words, lower-cased, punctuation stripped) and exact match with the reference.
  Baselines: the F1 of each reference against another item's reference, i.e. what the caption template alone earns
  (the caption's answer prior), and the image-blind control.
"""
from __future__ import annotations

from collections import Counter

from evals.context import EvalContext, HeldOutTask, TaskResult
from evals.controls import answer_prior, blinded


def words(text: str) -> list[str]:
    return text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split()


def overlap_f1(reference: str, predicted: str) -> float:
    r, p = Counter(words(reference)), Counter(words(predicted))
    common = sum((r & p).values())
    if common == 0:
        return 0.0
    prec, rec = common / sum(p.values()), common / sum(r.values())
    return 2 * prec * rec / (prec + rec)


def generate_answers(ctx: EvalContext, prompts: list[list[int]], gen_length: int,
                     desc: str) -> tuple[list[str], int, float]:
    """Generated strings (up to the first EOS), the total sampler forward passes, and tokens per forward: answer
    tokens (each answer and its EOS) / denoising forwards (prefill not counted) x the rows that shared them, so
    with eval.batch_size=1 it is each answer's own count, what parallel-decoding distillation raises."""
    from tqdm import tqdm

    from training.diffusion.samplers import generate_text

    e = ctx.ecfg
    settings = ctx.sampler.replace(gen_length=gen_length)
    texts, nfe, tokens, forwards = [], 0, 0, 0
    for s in tqdm(range(0, len(prompts), e.batch_size), desc=desc, disable=not (e.progress and ctx.is_main),
                  leave=False):
        res = generate_text(ctx.model, prompts[s:s + e.batch_size], settings, mask_id=ctx.specials.mask,
                            eos_id=ctx.specials.eos, device=ctx.device)
        nfe += res.nfe
        tokens += int((res.lengths + 1).clamp(max=gen_length).sum())
        forwards += res.steps * len(res.lengths)
        for row, n in zip(res.tokens.cpu(), res.lengths.cpu()):
            texts.append(ctx.tokenizer.decode(row[:int(n)].tolist()).strip())
    return texts, nfe, tokens / max(forwards, 1)


class VQATask(HeldOutTask):
    name = "vqa"
    needs = ("model", "specials", "tokenizer", "data")
    items_of = "vqa"

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        from data_pipeline.shapes import score_answer
        from evals.heldout import answer_set

        answers, nfe, tpf = generate_answers(ctx, [it.prompt for it in items], ctx.ecfg.vqa_gen_length, "vqa")
        hits = [score_answer(it.reference, a) for it, a in zip(items, answers)]
        blind_hits = None
        if ctx.ecfg.image_blind:
            blind, *_ = generate_answers(ctx, [it.prompt for it in blinded(ctx, items)], ctx.ecfg.vqa_gen_length,
                                        "vqa (image-blind)")
            blind_hits = [score_answer(it.reference, a) for it, a in zip(items, blind)]
        prior, prior_by_type = answer_prior([it.reference for it in items], [it.qtype for it in items])
        by_type: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_type.setdefault(it.qtype, []).append(i)
        table, chance_sum = [], 0.0
        for q, idx in sorted(by_type.items()):
            try:
                chance = 1.0 / len(answer_set(q))
            except ValueError:
                chance = 0.0
            chance_sum += chance * len(idx)
            row = {"type": q, "accuracy": round(sum(hits[i] for i in idx) / len(idx), 4), "chance": round(chance, 4),
                   "answer_prior": round(prior_by_type[q], 4)}
            if blind_hits is not None:
                row["image_blind"] = round(sum(blind_hits[i] for i in idx) / len(idx), 4)
            table.append({**row, "n": len(idx)})
        n = len(items)
        samples = [{"question": it.question, "expected": it.reference, "generated": a, "correct": bool(h),
                    "qtype": it.qtype} for it, a, h in list(zip(items, answers, hits))[:8]]
        baselines = {"accuracy": chance_sum / n, "answer_prior": prior}
        if blind_hits is not None:
            baselines["image_blind"] = sum(blind_hits) / n
        res = TaskResult(self.name, scores={"accuracy": sum(hits) / n, "items": float(n), "nfe": float(nfe),
                                              "tokens_per_forward": tpf},
                         baselines=baselines, samples=samples)
        res.tables["per_type"] = table
        return res


class CaptionTask(HeldOutTask):
    name = "caption"
    needs = ("model", "specials", "tokenizer", "data")
    items_of = "caption"

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        caps, nfe, tpf = generate_answers(ctx, [it.prompt for it in items], ctx.ecfg.caption_gen_length, "caption")
        f1 = [overlap_f1(it.reference, c) for it, c in zip(items, caps)]
        exact = [words(it.reference) == words(c) for it, c in zip(items, caps)]
        n = len(items)
        # Template baseline: another scene's reference caption as the "prediction".
        shifted = [overlap_f1(items[i].reference, items[(i + 1) % n].reference) for i in range(n)] if n > 1 else [0.0]
        samples = [{"reference": it.reference, "generated": c, "f1": round(f, 4)}
                   for it, c, f in list(zip(items, caps, f1))[:8]]
        baselines = {"f1": sum(shifted) / len(shifted), "exact": 0.0, "answer_prior": sum(shifted) / len(shifted)}
        if ctx.ecfg.image_blind:
            blind, *_ = generate_answers(ctx, [it.prompt for it in blinded(ctx, items)], ctx.ecfg.caption_gen_length,
                                        "caption (image-blind)")
            baselines["image_blind"] = sum(overlap_f1(it.reference, c) for it, c in zip(items, blind)) / n
        return TaskResult(self.name, scores={"f1": sum(f1) / n, "exact": sum(exact) / n, "items": float(n),
                                             "nfe": float(nfe), "tokens_per_forward": tpf}, baselines=baselines,
                         samples=samples)
