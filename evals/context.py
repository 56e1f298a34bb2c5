"""What every eval task receives (`EvalContext`) and returns (`TaskResult`), and the `Task` protocol.

A task works on whatever it is handed: the trained backbone, or a reference model (oracle / uniform, see
`evals.reference_models`) in tests, and held-out items from `evals.heldout` or built by a test. Anything a task
needs and the context lacks makes it return `TaskResult.skipped(reason)`, which the report shows: nothing is
silently dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch


@dataclass
class EvalContext:
    cfg: Any  # training.config.Config (tasks read cfg.eval, cfg.diffusion, cfg.model)
    model: Any = None  # backbone: model(input_ids, position_ids, attention_mask, past_kv, use_cache) -> .logits/.kv
    specials: Any = None  # data_pipeline.layout.SpecialTokens (mask, eos, image_start, ..., grid ids)
    tokenizer: Any = None  # text tokenizer: encode(str) -> ids, decode(ids) -> str
    image_tokenizer: Any = None  # data_pipeline ImageTokenizer (encode pixels -> VQ ids)
    decoders: dict[str, Callable] = field(default_factory=dict)  # name -> (ids [B,gh,gw]) -> images [B,3,H,W] in [-1,1]
    data: Any = None  # held-out items (evals.heldout.HeldOut or anything with the same methods)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0  # data-parallel rank / size for the likelihood tasks (others run on rank 0)
    world: int = 1
    out_dir: Path | None = None  # where figures go
    run_dir: Path | None = None  # metrics.jsonl / expert loads for the report's training plots
    unavailable: dict[str, str] = field(default_factory=dict)  # attribute -> why it could not be loaded

    @property
    def ecfg(self):
        return self.cfg.eval

    @property
    def image_offset(self) -> int:
        return int(self.cfg.model.image_token_offset)

    @property
    def codebook_size(self) -> int:
        return int(self.cfg.model.vocab_size) - self.image_offset

    @property
    def sampler(self):
        """The configured sampler settings (`diffusion.sample_*`, `cfg_*`), passed whole to the samplers; a task
        changes a field with `.replace(...)`."""
        from training.diffusion.samplers.settings import SamplerSettings

        return SamplerSettings.from_config(self.cfg.diffusion)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TaskResult:
    name: str
    scores: dict[str, float] = field(default_factory=dict)  # the task's numbers
    baselines: dict[str, float] = field(default_factory=dict)  # chance level / trivial baseline beside each score
    samples: list[dict] = field(default_factory=list)  # a few worked examples (json-able)
    figures: dict[str, str] = field(default_factory=dict)  # caption -> PNG path (relative to the report)
    tables: dict[str, list[dict]] = field(default_factory=dict)  # table name -> rows (per category, per decoder...)
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0

    @classmethod
    def skipped(cls, name: str, reason: str) -> "TaskResult":
        return cls(name=name, status="skipped", reason=reason)

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "reason": self.reason, "seconds": round(self.seconds, 3),
                "scores": self.scores, "baselines": self.baselines, "tables": self.tables,
                "figures": self.figures, "samples": self.samples}


class Task(Protocol):
    name: str
    distributed: bool  # True: every rank runs it on its share of items and the result is reduced

    def run(self, ctx: EvalContext) -> TaskResult: ...


def missing(ctx: EvalContext, *needs: str) -> str:
    """'' if the context has all of `needs` (attribute names), else a reason naming what is missing."""
    absent = [n for n in needs if getattr(ctx, n) is None or (isinstance(getattr(ctx, n), dict)
                                                              and not getattr(ctx, n))]
    if not absent:
        return ""
    return "; ".join(f"needs {n}: {ctx.unavailable.get(n, 'not given to this context')}" for n in absent)


class HeldOutTask:
    """The prologue every task shares: skipped if the context lacks one of `needs`, or when it has no items of its
    kind (the first eval.num_samples of `ctx.data.<items_of>`; `items` may choose otherwise); then timed.
    A task sets name, distributed, needs, items_of (and nothing) and defines `score(ctx, items)`."""

    name = ""
    distributed = False
    needs: tuple[str, ...] = ("model", "specials", "data")
    items_of = ""
    nothing = ""  # the skip reason without items ("" = "no held-out <items_of> items")

    def items(self, ctx: EvalContext) -> list:
        return list(getattr(ctx.data, self.items_of)[:ctx.ecfg.num_samples])

    def score(self, ctx: EvalContext, items: list) -> TaskResult:
        raise NotImplementedError

    def run(self, ctx: EvalContext) -> TaskResult:
        why = missing(ctx, *self.needs)
        if why:
            return TaskResult.skipped(self.name, why)
        items = self.items(ctx)
        if not items:
            return TaskResult.skipped(self.name, self.nothing or f"no held-out {self.items_of} items")
        t0 = time.time()
        res = self.score(ctx, items)
        res.seconds = res.seconds or time.time() - t0
        return res
