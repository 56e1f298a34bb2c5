"""Shared fixtures. Tests are grouped by tier with markers: unit, dist, slurm, e2e (see pyproject)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_cfg():
    from training.config import load_config

    return load_config(ROOT / "configs/model/tiny.yaml")
