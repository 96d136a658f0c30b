"""Learning-rate schedule of the report: linear warm-up, then cosine decay to a floor (10% of peak)."""

from __future__ import annotations

import math


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate at optimizer step `step` (0-based).

    Warm-up: peak * step / warmup for step < warmup. Then cosine from peak down to min_ratio * peak at
    step == total, and constant at the floor after it.
    """
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
