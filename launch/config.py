"""Config section `launch`: local torchrun and SLURM settings."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LaunchConfig:
    nproc: int = 1  # processes per node (GPUs per node on a cluster)
    nodes: int = 1

    def validate(self, root) -> None:
        pass
