"""VLMEvalKit model adapter (open-compass/VLMEvalKit, `vlmeval/vlm/base.py`).

VLMEvalKit calls `generate(message, dataset)` on a `vlmeval.vlm.base.BaseModel` subclass, which validates the
message and calls `generate_inner(message, dataset=None) -> str`; `message` is a list like
`[dict(type='image', value=PATH), dict(type='text', value=PROMPT)]` (INTERLEAVE=True: images and text in order).
The method lives in `VLMEvalKitMethods` (no vlmeval import) so it runs and is tested without the package;
`register()` builds the real subclass and adds it to `vlmeval.config.supported_VLM` when VLMEvalKit is installed:

    from evals.adapters.vlmevalkit import register; register(config="configs/experiments/x.yaml")
    python run.py --data MMBench_DEV_EN --model unidiff
"""
from __future__ import annotations

from evals.adapters.core import MultimodalModel


class VLMEvalKitMethods:
    INTERLEAVE = True
    allowed_types = ["text", "image"]

    def __init__(self, config: str = "", checkpoint: str = "", device=None, model: MultimodalModel | None = None,
                 max_new_tokens: int = 64, **kwargs):
        if model is None:
            overrides = [f"eval.checkpoint={checkpoint}"] if checkpoint else []
            model = MultimodalModel.from_config(config, overrides, device)
        self.mm = model
        self.max_new_tokens = max_new_tokens

    def generate_inner(self, message, dataset=None) -> str:
        from PIL import Image

        images, texts = [], []
        for item in message:
            if item["type"] == "image":
                value = item["value"]
                images.append(value if isinstance(value, Image.Image) else Image.open(value).convert("RGB"))
            elif item["type"] == "text":
                texts.append(str(item["value"]))
            else:
                raise ValueError(f"message item type {item['type']!r} is not supported: text | image")
        return self.mm.generate(images, "\n".join(texts), self.max_new_tokens)


def register(name: str = "unidiff", **kwargs):
    """Define the VLMEvalKit model class and add `name` to `vlmeval.config.supported_VLM`; returns the class."""
    from functools import partial

    try:
        from vlmeval.config import supported_VLM
        from vlmeval.vlm.base import BaseModel
    except ImportError as e:
        raise ImportError("the VLMEvalKit adapter needs VLMEvalKit (git install of open-compass/VLMEvalKit); "
                          "unidiff itself does not depend on it") from e
    class UnidiffVLM(VLMEvalKitMethods, BaseModel):
        pass

    supported_VLM[name] = partial(UnidiffVLM, **kwargs)
    return UnidiffVLM
