"""The sampler's knobs as one object, passed whole to `generate_text`, `generate_image` and `edit_image`.

Built from the config in one place (`SamplerSettings.from_config(cfg.diffusion)`: the `diffusion.sample_*` /
`cfg_*` keys, whose defaults and comments live in training/diffusion/config.py); a caller that needs another value
for one call (an eval's own generation length or guidance scale) replaces that field, it does not unpack the rest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# field -> config key of `diffusion` (the one mapping between the two spellings)
CONFIG_KEYS = {"gen_length": "sample_gen_length", "block_length": "sample_block_length", "steps": "sample_steps",
               "image_steps": "sample_image_steps", "threshold": "sample_threshold", "strategy": "sample_strategy",
               "temperature": "sample_temperature", "cfg_scale": "cfg_scale", "cfg_rescale": "cfg_rescale",
               "text_scale": "cfg_text_scale", "image_scale": "cfg_image_scale"}


@dataclass(frozen=True)
class SamplerSettings:
    gen_length: int  # max new text tokens
    block_length: int  # tokens per decoding block
    steps: int  # denoising steps per text block (an upper bound with threshold acceptance)
    image_steps: int  # denoising steps per image block
    threshold: float  # accept every token whose probability exceeds this (>= 1: the fixed schedule)
    strategy: str  # confidence score: low_confidence | top_k_margin | neg_entropy
    temperature: float  # 0 = greedy
    cfg_scale: float  # text-to-image guidance scale (1 = conditional only)
    cfg_rescale: float  # guided-logit std pulled back to the conditional one's (0 = off)
    text_scale: float  # editing: instruction guidance
    image_scale: float  # editing: source-image guidance

    @classmethod
    def from_config(cls, dcfg=None, **overrides) -> "SamplerSettings":
        """dcfg: the `diffusion` config section (None: its defaults); overrides: fields of this class."""
        if dcfg is None:
            from training.diffusion.config import DiffusionConfig

            dcfg = DiffusionConfig()
        unknown = set(overrides) - set(CONFIG_KEYS)
        if unknown:
            raise TypeError(f"SamplerSettings has no field {sorted(unknown)}; fields: {', '.join(CONFIG_KEYS)}")
        return cls(**{f: overrides.get(f, getattr(dcfg, key)) for f, key in CONFIG_KEYS.items()})

    def replace(self, **changes) -> "SamplerSettings":
        return dataclasses.replace(self, **changes)
