"""Learning-rate schedules as multipliers of the peak lr, for
:class:`torch.optim.lr_scheduler.LambdaLR`.

All schedules share a linear warm-up from ``warmup_init_lr`` to the peak ``lr`` over
``warmup_steps`` updates, then:

* ``constant``: the peak lr;
* ``linear``: linear decay to ``min_lr`` at ``total_steps``;
* ``cosine``: half-cosine decay to ``min_lr`` at ``total_steps``;
* ``inverse_sqrt``: ``lr * sqrt(warmup_steps / step)``, as fairseq's ``inverse_sqrt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lr_multiplier", "SCHEDULES"]

SCHEDULES = ("constant", "linear", "cosine", "inverse_sqrt")


def lr_multiplier(
    schedule: Mapping[str, Any], peak_lr: float, total_steps: int
) -> Callable[[int], float]:
    """A function ``step -> lr / peak_lr`` for the config section ``schedule``."""
    name = schedule["name"]
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule.name {name!r}; choose one of {', '.join(SCHEDULES)}")
    warmup = int(schedule.get("warmup_steps", 0))
    if warmup < 0:
        raise ValueError(f"schedule.warmup_steps must be >= 0, got {warmup}")
    if peak_lr <= 0:
        return lambda step: 1.0
    init = float(schedule.get("warmup_init_lr", 0.0)) / peak_lr
    floor = float(schedule.get("min_lr", 0.0)) / peak_lr
    total = max(int(total_steps), warmup + 1)

    def multiplier(step: int) -> float:
        if step < warmup:
            return init + (1.0 - init) * step / warmup
        if name == "constant":
            return 1.0
        if name == "inverse_sqrt":
            return math.sqrt(max(warmup, 1) / max(step, 1))
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        if name == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
