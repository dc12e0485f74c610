"""Which samples a rank trains on at an optimiser step: the data position is the step number, so a
resumed run continues exactly where it stopped."""

from __future__ import annotations

import numpy as np


def rank_share(samples, step, steps_per_epoch, global_batch, seed, rank, world, cache):
    """This rank's samples of optimiser step ``step``: a seeded permutation per epoch (epoch 0 in file
    order), the step's ``global_batch`` contiguous slice, split into ``world`` near-equal parts.
    ``cache`` keeps the current epoch's permutation between calls."""
    epoch, b = divmod(step, steps_per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = np.random.default_rng([seed, epoch]).permutation(len(samples)) if epoch else np.arange(len(samples))
    idx = cache[epoch][b * global_batch : (b + 1) * global_batch]
    return [samples[i] for i in np.array_split(idx, world)[rank]]


def planned_counts(samples, total_steps, steps_per_epoch, global_batch, seed) -> dict[str, int]:
    """How many samples of each task (``sample.task``) the first ``total_steps`` optimiser steps draw, over all
    ranks: a short run (a sweep trial) sees only the front of its epoch's order, and a small task can miss it
    entirely, which makes that task's knobs (its loss weight) change nothing."""
    counts: dict[str, int] = {}
    cache: dict = {}
    for step in range(total_steps):
        for s in rank_share(samples, step, steps_per_epoch, global_batch, seed, 0, 1, cache):
            counts[s.task] = counts.get(s.task, 0) + 1
    return counts
