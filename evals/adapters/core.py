"""What both harness adapters need from a trained checkpoint: answer a (images, text) prompt, and score a
continuation's log-likelihood bound given a prompt. Built on the same pieces as the harness's own tasks (chat
layout, image tokenizer preprocessing, block sampler, Monte Carlo ELBO), so numbers agree with `unidiff eval`.
"""
from __future__ import annotations

import torch

from evals.context import EvalContext


class MultimodalModel:
    def __init__(self, ctx: EvalContext):
        for need in ("model", "specials", "tokenizer"):
            if getattr(ctx, need) is None:
                raise RuntimeError(f"the adapter needs a {need}: {ctx.unavailable.get(need, 'not loaded')}")
        self.ctx = ctx

    @classmethod
    def from_config(cls, config: str, overrides: list[str] | None = None, device=None) -> "MultimodalModel":
        from evals.harness import build_context
        from training.config import load_config

        cfg = load_config(config, overrides or [])
        return cls(build_context(cfg, device=device))

    def image_blocks(self, images) -> list[tuple]:
        """PIL images -> [(ids [gh, gw], gh, gw)] with the understanding preprocessing of training."""
        if not images:
            return []
        if self.ctx.image_tokenizer is None:
            raise RuntimeError(f"images given but no image tokenizer: {self.ctx.unavailable.get('image_tokenizer')}")
        from data_pipeline.image_tokenizer.prepare import tokenize_image

        out = []
        for img in images:
            _, ids = tokenize_image(img, self.ctx.image_tokenizer, self.ctx.cfg.data.image_tokenizer, "understand")
            out.append((ids, *ids.shape))
        return out

    def prompt(self, images, text: str) -> list[int]:
        from data_pipeline import layout

        text = text.replace("<image>", "").strip()
        return layout.chat_prompt(self.ctx.tokenizer, self.ctx.specials, self.ctx.image_offset,
                                  layout.SYSTEM_UNDERSTAND, text, self.image_blocks(images))

    def generate(self, images, text: str, max_new_tokens: int | None = None, until: list[str] | None = None) -> str:
        from evals.tasks.vqa import generate_answers

        n = max_new_tokens or self.ctx.sampler.gen_length
        out, *_ = generate_answers(self.ctx, [self.prompt(images, text)], n, "generate")
        answer = out[0]
        for stop in until or []:
            if stop and stop in answer:
                answer = answer[:answer.index(stop)]
        return answer

    def loglikelihood(self, images, context: str, continuation: str) -> tuple[float, bool]:
        """(lower bound on log p(continuation | images, context) = -NELBO, is_greedy). is_greedy: one forward with
        the whole continuation masked predicts every token by argmax (the cheap check; LLaDA's iterative one is slow
        and recommended off)."""
        from evals.tasks.choice import score_candidates

        prompt = self.prompt(images, context)
        cont = self.ctx.tokenizer.encode(continuation)
        if not cont:
            return 0.0, True
        nelbo = float(score_candidates(self.ctx, prompt, [cont], key=hash_key(context + "\x00" + continuation))[0])
        ids = torch.as_tensor(prompt + [self.ctx.specials.mask] * len(cont), device=self.ctx.device)[None]
        with torch.no_grad():
            logits = self.ctx.model(input_ids=ids).logits[0, len(prompt):]
        greedy = bool((logits.argmax(-1).cpu() == torch.as_tensor(cont)).all())
        return -nelbo, greedy

    def loglikelihood_rolling(self, text: str) -> float:
        """-NELBO of the whole text (every token maskable)."""
        from evals.likelihood import LikelihoodItem, nelbo_draws
        from evals.tasks.elbo import elbo_block_size

        ids = torch.as_tensor(self.ctx.tokenizer.encode(text) + [self.ctx.specials.eos], dtype=torch.long)
        item = LikelihoodItem(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool),
                              hash_key(text))
        e = self.ctx.ecfg
        d = nelbo_draws(self.ctx.model, [item], mc=e.elbo_mc, estimator=e.elbo_estimator, sampling=e.elbo_sampling,
                        eps=e.elbo_eps, block_size=elbo_block_size(self.ctx), mask_id=self.ctx.specials.mask,
                        batch_size=e.batch_size, seed=e.seed, device=self.ctx.device)
        return -float(d.sum(-1).mean())


def hash_key(text: str) -> int:
    """A stable seed key for a request (Python's str hash is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "little")
