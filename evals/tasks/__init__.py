"""Eval tasks: one small module each, one interface (`evals.context.Task`: name, distributed, run(ctx) -> TaskResult)."""
from __future__ import annotations

import importlib

# name -> "module:class"; imported lazily so `unidiff eval --tasks elbo` never imports the decoder stack.
REGISTRY = {
    "elbo": "evals.tasks.elbo:ElboTask",
    "choice": "evals.tasks.choice:ChoiceTask",
    "vqa": "evals.tasks.vqa:VQATask",
    "caption": "evals.tasks.vqa:CaptionTask",
    "t2i": "evals.tasks.t2i:T2ITask",
    "reconstruction": "evals.tasks.reconstruction:ReconstructionTask",
    "speed": "evals.tasks.speed:SpeedTask",
}


def get_task(name: str):
    if name not in REGISTRY:
        raise KeyError(f"eval task {name!r} is not known: {' | '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
