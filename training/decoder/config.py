"""Config sections `decoder` (the image-token -> pixels DiT and its training) and `distill` (few-step student)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DecoderConfig:
    steps: int = 50  # sampler steps at generation time

    def validate(self, root) -> None:
        pass


@dataclass
class DistillConfig:
    steps: int = 8  # student sampler steps

    def validate(self, root) -> None:
        pass
