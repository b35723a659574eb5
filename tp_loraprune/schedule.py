"""Pruning-ratio schedules: the fraction of the final target reached at an optimizer step (pure functions)."""

from __future__ import annotations

from typing import Literal

ScheduleKind = Literal["cubic", "linear"]


def progress(
    step: int, total_steps: int, kind: ScheduleKind = "cubic", warmup: float = 0.1, cooldown: float = 0.1
) -> float:
    """Fraction of the final ratio to have pruned after `step` of `total_steps` optimizer steps.

    0 during the first `warmup` of the run (the moving average warms up), 1 during the last `cooldown`
    (LoRA recovers on the final architecture), and in between cubic as in the official LoRAPrune code,
    r(t) = r_f · (1 − (1 − u)³) with u the position in the ramp, or linear, r(t) = r_f · u.
    """
    start, end = warmup * total_steps, (1.0 - cooldown) * total_steps
    if step <= start:
        return 0.0
    if step >= end:
        return 1.0
    u = (step - start) / (end - start)
    return 1.0 - (1.0 - u) ** 3 if kind == "cubic" else u
