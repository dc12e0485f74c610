"""Ranking metrics with one relevant item per row (METHOD.md 1.8, R10). Pure Python, no torch.

r = 0-based rank of the first returned SID equal to the target SID (None = miss). Over N rows:
HR@K = (1/N) sum 1[r < K];  NDCG@K = (1/N) sum 1[r < K] / log2(r + 2)  (ideal DCG = 1).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence


def first_hit_rank(ranked: Sequence[str], target: str) -> int | None:
    """0-based position of the first ``target`` in ``ranked`` (exact string match), None if absent."""
    for i, sid in enumerate(ranked):
        if sid == target:
            return i
    return None


def hit_rate_at_k(ranks: Sequence[int | None], k: int) -> float:
    """HR@K over first-hit ranks (None = miss)."""
    if not ranks:
        raise ValueError("no rows to score")
    return sum(1 for r in ranks if r is not None and r < k) / len(ranks)


def ndcg_at_k(ranks: Sequence[int | None], k: int) -> float:
    """NDCG@K over first-hit ranks with a single relevant item (ideal DCG = 1)."""
    if not ranks:
        raise ValueError("no rows to score")
    return sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks)


def invalid_count(ranked_lists: Sequence[Sequence[str]], valid: Collection[str],
                  consistent: Sequence[Sequence[bool]] | None = None) -> int:
    """Returned SIDs that are invalid, counted over every returned beam (not stopping at a hit).

    A beam is invalid when its SID string (spelled from the decoded token ids) is not a catalogue
    SID, or, with ``consistent``, when its flag is False (the decoded ids disagree with the leaf the
    constraint tables say the beam reached).
    """
    flags = consistent if consistent is not None else [[True] * len(r) for r in ranked_lists]
    return sum(1 for ranked, ok in zip(ranked_lists, flags, strict=True)
               for sid, good in zip(ranked, ok, strict=True) if sid not in valid or not good)


def ranking_metrics(ranks: Sequence[int | None], ks: Sequence[int], beams: int) -> dict[str, float]:
    """``{"hr@K": ..., "ndcg@K": ...}`` for every K in ``ks`` with K <= ``beams`` (R10), in K order."""
    out: dict[str, float] = {}
    for k in sorted({int(k) for k in ks if 0 < int(k) <= beams}):
        out[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return out
