"""lmms-eval model adapter (EvolvingLMMs-Lab/lmms-eval, `lmms_eval/api/model.py`).

lmms-eval calls, on a subclass of `lmms_eval.api.model.lmms` registered with `@register_model(name)`:
  loglikelihood(requests)  each `Instance.args` = (contexts, doc_to_target, doc_to_visual, doc_id, task, split)
                           -> [(logprob, is_greedy)]
  generate_until(requests) each `Instance.args` = (contexts, gen_kwargs, doc_to_visual, doc_id, task, split)
                           -> [str]; gen_kwargs carries `until` and `max_new_tokens`
where `doc_to_visual(self.task_dict[task][split][doc_id])` gives the PIL images and `task_dict` is filled by the
evaluator. The methods live in `LmmsEvalMethods` (no lmms-eval import), so they run and are tested without the
package. lmms-eval finds the model the way it documents for plugins: the entry point `unidiff` of the group
`lmms_eval.models` (pyproject.toml) names `manifest()`, whose class path is `evals.adapters.lmms_eval_model.UnidiffLMMS`
(built by `register()`, imported by lmms-eval only when `--model unidiff` is asked for):

    python -m lmms_eval --model unidiff --model_args config=configs/experiments/x.yaml,checkpoint=runs/x/... --tasks ...

A local task over the shapes val split: `evals.adapters.lmms_shapes_task` (docs/evals.md).
"""
from __future__ import annotations

from tqdm import tqdm

from evals.adapters.core import MultimodalModel


class LmmsEvalMethods:
    def __init__(self, config: str = "", checkpoint: str = "", device=None, model: MultimodalModel | None = None,
                 **kwargs):
        if model is None:
            overrides = [f"eval.checkpoint={checkpoint}"] if checkpoint else []
            model = MultimodalModel.from_config(config, overrides, device)
        self.mm = model
        self.task_dict = getattr(self, "task_dict", None) or {}
        self._rank, self._world_size = 0, 1

    def _visuals(self, doc_to_visual, doc_id, task, split):
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        flat = []
        for v in visuals or []:  # lmms-eval tasks may nest lists of images
            flat += list(v) if isinstance(v, (list, tuple)) else [v]
        return [v for v in flat if v is not None]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="unidiff loglikelihood", disable=len(requests) < 8):
            contexts, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            out.append(self.mm.loglikelihood(self._visuals(doc_to_visual, doc_id, task, split), contexts,
                                             str(continuation)))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc="unidiff generate", disable=len(requests) < 8):
            contexts, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.append(self.mm.generate(self._visuals(doc_to_visual, doc_id, task, split), contexts,
                                        gen_kwargs.get("max_new_tokens"), until))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        return [self.mm.loglikelihood_rolling(req.args[0]) for req in requests]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("unidiff's lmms-eval adapter answers single-round requests (generate_until)")


def register(name: str = "unidiff"):
    """Define the lmms-eval model class and register it under `name`; returns the class."""
    try:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import register_model
    except ImportError as e:
        raise ImportError("the lmms-eval adapter needs the `lmms-eval` package (pip install lmms-eval); "
                          "unidiff itself does not depend on it") from e
    class UnidiffLMMS(LmmsEvalMethods, lmms):
        is_simple = True

        def __init__(self, **kwargs):
            lmms.__init__(self)  # rank/world, cache hook, task_dict (filled by the evaluator)
            LmmsEvalMethods.__init__(self, **kwargs)

    return register_model(name)(UnidiffLMMS)


def manifest():
    """The `lmms_eval.models` entry point: lmms-eval's model manifest for `--model unidiff`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="unidiff", simple_class_path="evals.adapters.lmms_eval_model.UnidiffLMMS")
