"""Learning-rate schedules: linear warm-up, then constant, linear or cosine decay to a floor."""

from __future__ import annotations

import math

from fleet.config import LearningSchedule


def lr_at(step: int, s: LearningSchedule) -> float:
    """The learning rate for optimizer step ``step`` (0-based) of a run of ``s.steps`` steps."""
    if s.warmup_steps and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return s.lr
    span = max(1, s.steps - s.warmup_steps)
    t = min(1.0, (step - s.warmup_steps) / span)
    floor = s.lr * s.min_lr_ratio
    if s.decay == "linear":
        return floor + (s.lr - floor) * (1.0 - t)
    return floor + (s.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
