"""`t2i`: text-to-image on held-out shapes captions -> VQ tokens (CFG block sampler
`training.diffusion.samplers.generate_image`, diffusion.sample_* settings) -> each decoder -> pixels, scored by the
shapes world's deterministic detector (`data_pipeline.shapes.detect`) against the answer key, GenEval-style: per
category (exact scene, count, colour, shape, position) and overall = mean of the categories.

Baselines: `wrong_prompt` = a perfect rendering of another item's scene (a generator that ignores the prompt), and
`detector_ceiling` = the ground-truth rendering of the same scene (what a perfect generator + decoder can reach).
"""
from __future__ import annotations

import torch

from evals.context import EvalContext, HeldOutTask, TaskResult
from evals.images import CATEGORIES, scene_scores, to_pil


def _mean(rows: list[dict]) -> dict[str, float]:
    out = {c: sum(r[c] for r in rows) / max(len(rows), 1) for c in CATEGORIES}
    out["overall"] = sum(out[c] for c in CATEGORIES) / len(CATEGORIES)
    return out


def generate_codes(ctx: EvalContext, item) -> tuple[torch.Tensor, int, int]:
    """VQ code grid [gh, gw] for one item, the sampler's forward passes and its denoising ones (prefill not
    counted)."""
    from training.diffusion.samplers import generate_image

    settings = ctx.sampler
    if ctx.ecfg.t2i_cfg_scale >= 0:
        settings = settings.replace(cfg_scale=ctx.ecfg.t2i_cfg_scale)
    uncond = item.uncond if settings.cfg_scale != 1.0 else None
    res = generate_image(ctx.model, item.cond, uncond, item.grid, settings, mask_id=ctx.specials.mask,
                         image_offset=ctx.image_offset, codebook_size=ctx.codebook_size, device=ctx.device)
    return res.codes[0].cpu(), res.nfe, res.steps


class T2ITask(HeldOutTask):
    name = "t2i"
    needs = ("model", "specials", "data", "decoders")
    items_of = "t2i"

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        from tqdm import tqdm

        from data_pipeline.shapes import detect, render

        codes, nfe, steps = [], 0, 0
        for it in tqdm(items, desc="t2i tokens", disable=not (ctx.ecfg.progress and ctx.is_main), leave=False):
            c, n, k = generate_codes(ctx, it)
            codes.append(c)
            nfe, steps = nfe + n, steps + k
        # image tokens per denoising forward, the parallel-decoding figure distill-backbone is judged on
        scores: dict[str, float] = {"items": float(len(items)), "nfe_per_image": nfe / len(items),
                                    "tokens_per_forward": sum(c.numel() for c in codes) / max(steps, 1)}
        table, samples, figures = [], [], {}
        first = None
        for name, decode in ctx.decoders.items():
            rows, pictures = [], []
            for s in range(0, len(items), ctx.ecfg.batch_size):
                batch = torch.stack(codes[s:s + ctx.ecfg.batch_size])
                images = decode(batch)
                for it, img in zip(items[s:s + ctx.ecfg.batch_size], images):
                    found = detect(to_pil(img), image_size=it.scene.image_size)
                    rows.append(scene_scores(it.scene, found))
                    pictures.append(img)
            m = _mean(rows)
            first = first or m
            for k, v in m.items():
                scores[f"{name}/{k}"] = v
            table.append({"decoder": name, **{k: round(v, 4) for k, v in m.items()}})
            if ctx.out_dir is not None and ctx.is_main:
                from evals.figures import image_grid

                k = min(ctx.ecfg.grid_images, len(pictures))
                path = image_grid([to_pil(p) for p in pictures[:k]], [it.caption for it in items[:k]],
                                  ctx.out_dir / f"t2i_{name}.png")
                figures[f"t2i samples ({name} decoder)"] = path.name
        if first is not None:
            scores["overall"] = first["overall"]  # the first decoder's (student before teacher when both exist)
        wrong = _mean([scene_scores(it.scene, detect(render(items[(i + 1) % len(items)].scene)))
                       for i, it in enumerate(items)])
        ceiling = _mean([scene_scores(it.scene, detect(render(it.scene))) for it in items])
        samples = [{"caption": it.caption, "codes_head": c.flatten()[:8].tolist()} for it, c in zip(items[:4], codes)]
        res = TaskResult(self.name, scores=scores, baselines={"wrong_prompt/overall": wrong["overall"],
                                                              "detector_ceiling/overall": ceiling["overall"]},
                         samples=samples, figures=figures)
        res.tables["per_category"] = table + [{"decoder": "baseline: wrong prompt",
                                               **{k: round(v, 4) for k, v in wrong.items()}},
                                              {"decoder": "ceiling: ground-truth render",
                                               **{k: round(v, 4) for k, v in ceiling.items()}}]
        return res
