"""Learning-rate schedules as a pure function of the step, returning a factor applied to every group's own LR.

Scaling every parameter group relatively (never setting an absolute LR per group) is what keeps μP's per-group
multipliers intact through warmup and decay.
"""

from __future__ import annotations

import math

from rung.jobs.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on each group's base LR at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - max(int(cfg.decay_fraction * cfg.steps), 1)  # warmup-stable-decay
    if step < decay_start:
        return 1.0
    progress = (step - decay_start + 1) / (cfg.steps - decay_start)
    return 1.0 - (1 - floor) * min(progress, 1.0)
