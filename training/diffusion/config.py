"""Config section `diffusion`: the masked / block diffusion objective."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DiffusionConfig:
    # Block-size schedule as [[step, block_size], ...]: from `step` on, use `block_size`; 0 means the whole
    # sequence (MDLM, x_t half only). The LLaDA2.0 WSD schedule is e.g. [[0,1],[100,4],[200,32],[300,0],[900,32]].
    block_schedule: list[list[int]] = field(default_factory=lambda: [[0, 32]])

    def validate(self, root) -> None:
        pass
