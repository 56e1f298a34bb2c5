"""Learning-rate schedules of every stage, as plain functions of the step (resumable by construction: a step's LR
depends on nothing but the step).

    wsd             the backbone (LLaDA2.0): linear warmup, constant, linear decay to the floor over the last steps
    warmup_cosine   the decoder stages: linear warmup, then cosine from the peak to the floor over the rest
"""
from __future__ import annotations

import math


def wsd(step: int, peak: float, floor: float, warmup: int, total: int, decay: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    decay_start = total - decay
    if decay > 0 and step >= decay_start:
        return peak + (floor - peak) * min((step - decay_start + 1) / decay, 1.0)
    return peak


def warmup_cosine(step: int, peak: float, floor: float, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * p))
