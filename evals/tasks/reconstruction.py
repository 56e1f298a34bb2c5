"""`reconstruction`: held-out image -> image tokenizer ids -> each decoder (teacher, student) -> PSNR / SSIM
against the original pixels, plus student-vs-teacher agreement on the same tokens (distillation quality).

Baseline: `flat` = the image's own mean colour everywhere (what a decoder that only gets the global colour right
scores). Semantic tokens are not meant for pixel fidelity: expect low PSNR at real scale (notes section 7).
"""
from __future__ import annotations

import torch

from evals.context import EvalContext, HeldOutTask, TaskResult
from evals.images import psnr_ssim, resize_to, to_pil


class ReconstructionTask(HeldOutTask):
    name = "reconstruction"
    needs = ("data", "decoders")
    items_of = "recon"
    nothing = "no held-out images"

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        scores, table, figures, outputs = {"items": float(len(items))}, [], {}, {}
        for name, decode in ctx.decoders.items():
            outs = []
            for s in range(0, len(items), ctx.ecfg.batch_size):
                outs += list(decode(torch.stack([it.ids for it in items[s:s + ctx.ecfg.batch_size]])))
            outputs[name] = outs
            pairs = [psnr_ssim(resize_to(o, it.image.shape[-2:]), it.image) for o, it in zip(outs, items)]
            scores[f"{name}/psnr"] = sum(p for p, _ in pairs) / len(pairs)
            scores[f"{name}/ssim"] = sum(s for _, s in pairs) / len(pairs)
            table.append({"decoder": name, "psnr": round(scores[f"{name}/psnr"], 3),
                          "ssim": round(scores[f"{name}/ssim"], 4)})
        if "teacher" in outputs and "student" in outputs:
            agree = [psnr_ssim(s, t) for s, t in zip(outputs["student"], outputs["teacher"])]
            scores["student_vs_teacher/psnr"] = sum(p for p, _ in agree) / len(agree)
            scores["student_vs_teacher/ssim"] = sum(s for _, s in agree) / len(agree)
        flat = [psnr_ssim(it.image.mean((1, 2), keepdim=True).expand_as(it.image), it.image) for it in items]
        baselines = {"flat/psnr": sum(p for p, _ in flat) / len(flat), "flat/ssim": sum(s for _, s in flat) / len(flat)}
        if ctx.out_dir is not None and ctx.is_main:
            from evals.figures import image_grid

            k = min(ctx.ecfg.grid_images, len(items))
            pics, titles = [], []
            for i in range(k):  # one column per item: original, then each decoder
                pics.append(to_pil(items[i].image))
                titles.append("original")
                for name, outs in outputs.items():
                    pics.append(to_pil(resize_to(outs[i], items[i].image.shape[-2:])))
                    titles.append(name)
            path = image_grid(pics, titles, ctx.out_dir / "reconstruction.png", cols=1 + len(outputs))
            figures["reconstruction (original | decoders)"] = path.name
        res = TaskResult(self.name, scores=scores, baselines=baselines, figures=figures)
        res.tables["per_decoder"] = table
        return res
