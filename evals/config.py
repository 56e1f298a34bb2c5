"""Config section `eval`: which tasks run and their sizes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["elbo"])

    def validate(self, root) -> None:
        pass
