"""Learning-rate schedules, as kohya sd-scripts and diffusers name them.

The rate of an optimizer step is ``learning_rate * lr_factor(step, ...)``, a pure function of the
global step (steps of a continued LoRA included) and the run's total, so a run resumed from a
checkpoint follows the same curve as one that never stopped, with no scheduler state to save.
Warmup rises linearly from 1/warmup to 1 over the first ``warmup`` steps; the decay then runs
over the remaining steps.
"""
from __future__ import annotations

import math

SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


def check_schedule(kind: str, warmup: int, cycles: int, power: float) -> None:
    """Fails early, naming the input, on settings no schedule can follow."""
    if kind not in SCHEDULERS:
        raise ValueError(f"lr_scheduler '{kind}' is unknown; choose one of {', '.join(SCHEDULERS)}")
    if warmup < 0:
        raise ValueError(f"lr_warmup_steps must be 0 or more, got {warmup}")
    if cycles < 1:
        raise ValueError(f"lr_scheduler_num_cycles must be 1 or more, got {cycles}")
    if not power > 0:
        raise ValueError(f"lr_scheduler_power must be positive, got {power}")


def lr_factor(step: int, total: int, kind: str = "constant", warmup: int = 0, cycles: int = 1,
              power: float = 1.0) -> float:
    """The learning-rate multiplier of the optimizer step that follows ``step`` completed steps
    (0-based), in a run of ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    if kind == "polynomial":
        return (1.0 - progress) ** power
    raise ValueError(f"lr_scheduler '{kind}' is unknown; choose one of {', '.join(SCHEDULERS)}")
