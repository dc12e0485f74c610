"""The learning-rate schedule of every training recipe (a ``LambdaLR`` multiplier per optimiser step)."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 over ``warmup_steps``, then ``kind``: "linear" decay to 0 at ``total_steps``
    (the Hugging Face default schedule), "cosine" decay to 0 at ``total_steps``, or "constant"."""
    if kind not in ("linear", "cosine", "constant"):
        raise ValueError(f"unknown LR schedule {kind!r}: linear, cosine or constant")

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f
