"""Sliding-window samples and the global chronological split (METHOD.md 1.1 steps 6-7).

Shared by every source that starts from raw interactions (``amazon2018``, ``synthetic``), so both build
samples by the same code path. A source returns a :class:`SourceData`; ``tsrec.data.prepare`` writes it.

Ordering contract (deterministic, matches the upstream script's stable sorts):
- interactions arrive sorted by (user index, timestamp, source order);
- samples are ordered by target timestamp, ties by user index, then by position in the user's sequence;
- ``user_id`` is ``"A" + user index`` (the MiniOneRec CSV convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tsrec.config import ConfigError
from tsrec.data.schema import SAMPLES_SCHEMA, SPLITS


@dataclass
class SourceData:
    """What a source reader returns: the catalogue, the three splits, its inputs and its statistics."""

    items: pa.Table
    splits: dict[str, pa.Table]
    inputs: dict[str, Path] = field(default_factory=dict)
    # Source-specific statistics; ``skipped`` maps a reason to a count of dropped rows.
    stats: dict[str, Any] = field(default_factory=dict)


def make_samples(users: np.ndarray, items: np.ndarray, times: np.ndarray, max_history: int) -> pa.Table:
    """Build one sample per interaction after each user's first, in chronological order.

    For a user's time-sorted items ``s``, position ``i >= 1`` gives history ``s[max(0, i - max_history):i]``
    and target ``s[i]``; repeats are kept (METHOD.md 1.1 step 6).

    Args:
        users: (N,) int user index per interaction; interactions of one user are contiguous.
        items: (N,) int64 dense item id per interaction.
        times: (N,) int64 timestamp (seconds) per interaction; non-decreasing within a user.
        max_history: history length cap (>= 1).

    Returns:
        A table with :data:`SAMPLES_SCHEMA`, sorted by target timestamp (stable: ties keep user, then
        position order).
    """
    if max_history < 1:
        raise ConfigError(f"data.max_history: must be >= 1, got {max_history}")
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    times = np.asarray(times, dtype=np.int64)
    n = len(users)
    idx = np.arange(n, dtype=np.int64)
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = users[1:] != users[:-1]
    seq_start = np.maximum.accumulate(np.where(is_first, idx, 0)) if n else idx
    target = np.nonzero(~is_first)[0]  # (S,) positions that have at least one earlier item
    hist_start = np.maximum(seq_start[target], target - max_history)
    lengths = target - hist_start
    offsets = np.zeros(len(target) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # flat[j] walks hist_start[s] .. target[s]-1 for every sample s, without a Python loop
    flat = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths) + np.repeat(hist_start, lengths)
    histories = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(items[flat], pa.int64()))

    order = np.argsort(times[target], kind="stable")
    user_ids = pc.binary_join_element_wise("A", pc.cast(pa.array(users[target][order]), pa.string()), "")
    return pa.table(
        {
            "user_id": user_ids,
            "history_item_ids": histories.take(pa.array(order)).cast(pa.list_(pa.int64())),
            "item_id": pa.array(items[target][order], pa.int64()),
            "timestamp": pa.array(times[target][order], pa.int64()),
        },
        schema=SAMPLES_SCHEMA,
    )


def split_bounds(n: int, fractions: list[float]) -> tuple[int, int]:
    """End indices of train and valid for ``n`` chronologically sorted samples.

    ``n_train = int(n * f0)`` and ``valid_end = int(n * (f0 + f1))``, exactly the upstream arithmetic
    for 8:1:1 (``int(n * 0.8)``, ``int(n * 0.9)``); the cumulative sum is rounded to 12 digits so that
    ``0.8 + 0.1`` means 0.9 and not 0.9000000000000001. Test takes the rest.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"data.split: expected three non-negative fractions summing to 1, got {fractions}")
    train_end = int(n * round(fractions[0], 12))
    valid_end = int(n * round(fractions[0] + fractions[1], 12))
    return train_end, max(train_end, valid_end)


def split_samples(samples: pa.Table, fractions: list[float]) -> dict[str, pa.Table]:
    """Global temporal split (METHOD.md 1.1 step 7): first ``f0`` train, next ``f1`` valid, rest test."""
    train_end, valid_end = split_bounds(samples.num_rows, fractions)
    bounds = {"train": (0, train_end), "valid": (train_end, valid_end), "test": (valid_end, samples.num_rows)}
    return {s: samples.slice(lo, hi - lo) for s, (lo, hi) in ((s, bounds[s]) for s in SPLITS)}


def empty_samples() -> pa.Table:
    return SAMPLES_SCHEMA.empty_table()
