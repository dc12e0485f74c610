"""SID collision resolution: every item gets a unique SID (METHOD.md 1.3 and R9).

Residual k-means (:mod:`tsrec.sid.rqkmeans`) can give two items the same codes at every level. tsrec
never leaves such collisions in place and never drops an item; ``sid.collision`` picks how they are
resolved:

- ``reassign`` (default): within a collision group, the item nearest to the group's last-level
  centroid keeps its code; every other item moves to the nearest *free* last-level code under the
  same prefix (codes of levels ``0..L-2``), greedily by distance. SIDs keep the fixed length ``L``.
  If a prefix holds more items than the last level has codes, no such assignment exists and
  :class:`CollisionError` says so and suggests ``sid.collision=extra_level``.
- ``extra_level``: every item gets one more token ``<d_r>`` (for 3 levels), ``r`` = 0-based rank of
  the item within its collision group (nearest to the last-level centroid first, then item order), so
  items without a collision get ``<d_0>`` and all SIDs have the same length ``L + 1``.

Why ``reassign`` is the default: the released MiniOneRec/TS-Rec indices and the vocabulary built from
them have exactly three tokens per item (``<a_*><b_*><c_*>``, METHOD.md 1.3), and the decoder, prompts
and SA-Init assume a fixed length; moving a colliding item to the closest unused last-level code keeps
its code semantic (its first ``L-1`` tokens are unchanged and the last one is the nearest available),
which is what MiniOneRec's Sinkhorn re-assignment of the last level aims for. ``extra_level``
matches MiniOneRec's constrained RQ-KMeans variant (there with 1-based ``r``) and is the dedup mode of
METHOD.md R9.

Tie-breaking everywhere is by (distance, item row, code), so the result is deterministic.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from tsrec.config import ConfigError

COLLISION_MODES = ("reassign", "extra_level")


class CollisionError(ConfigError):
    """Collisions cannot be resolved under the configured mode; the message names the fix."""


def collision_groups(codes: np.ndarray) -> list[np.ndarray]:
    """Groups of row indices that share a full SID (only groups of size >= 2), in first-row order.

    Args:
        codes: (N, L) integer codes.
    """
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    groups = [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]
    return sorted(groups, key=lambda g: int(g[0]))


def collision_stats(codes: np.ndarray) -> dict[str, int]:
    """``unique_sids``, ``collision_groups``, ``collision_items`` (items in groups >= 2), ``largest_group``."""
    _, counts = np.unique(codes, axis=0, return_counts=True)
    multi = counts[counts > 1]
    return {
        "unique_sids": int(len(counts)),
        "collision_groups": int(len(multi)),
        "collision_items": int(multi.sum()) if len(multi) else 0,
        "largest_group": int(counts.max()) if len(counts) else 0,
    }


def resolve_collisions(
    codes: np.ndarray, last_residual: np.ndarray, last_centroids: np.ndarray, mode: str = "reassign"
) -> tuple[np.ndarray, int]:
    """Make every row of ``codes`` unique.

    Args:
        codes: (N, L) int codes from residual k-means.
        last_residual: (N, D) input of the last level (see ``RQKMeansResult.last_residual``).
        last_centroids: (C, D) last-level centroids.
        mode: ``"reassign"`` or ``"extra_level"``.

    Returns:
        ``(new_codes, moved)``: (N, L) for ``reassign`` or (N, L + 1) for ``extra_level``, and the
        number of items whose last-level code changed (0 for ``extra_level``).

    Raises:
        CollisionError: ``reassign`` and some prefix holds more items than there are last-level codes.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if mode not in COLLISION_MODES:
        raise ConfigError(f"sid.collision: {mode!r} is not one of {list(COLLISION_MODES)}")
    # Distance of each item to the last-level centroid it was assigned: ranks items in a group.
    own = _sq_dist(last_residual, last_centroids[codes[:, -1]])  # (N,)
    if mode == "extra_level":
        return _extra_level(codes, own), 0
    return _reassign(codes, own, last_residual, last_centroids)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a.astype(np.float64) - b.astype(np.float64)
    return np.einsum("nd,nd->n", diff, diff)


def _extra_level(codes: np.ndarray, own: np.ndarray) -> np.ndarray:
    rank = np.zeros(len(codes), dtype=np.int64)
    for group in collision_groups(codes):
        ordered = group[np.lexsort((group, own[group]))]  # by distance, then row
        rank[ordered] = np.arange(len(ordered))
    return np.concatenate([codes, rank[:, None]], axis=1)  # (N, L + 1)


def _reassign(
    codes: np.ndarray, own: np.ndarray, last_residual: np.ndarray, last_centroids: np.ndarray
) -> tuple[np.ndarray, int]:
    n_codes = len(last_centroids)
    prefixes: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for row, prefix in enumerate(map(tuple, codes[:, :-1].tolist())):
        prefixes[prefix].append(row)
    # Check every prefix first, so the error lists all of them before any work is done.
    full = {p: len(rows) for p, rows in prefixes.items() if len(rows) > n_codes}
    if full:
        worst = max(full, key=lambda p: (full[p], p))
        raise CollisionError(
            f"sid.collision=reassign: {len(full)} SID prefix(es) hold more items than the {n_codes} "
            f"last-level codes (worst: prefix {list(worst)} with {full[worst]} items), so a unique "
            f"{codes.shape[1]}-token SID cannot be assigned; use sid.collision=extra_level "
            f"(adds a <d_r> token) or a larger sid.codebook_size / sid.levels"
        )

    movers_by_prefix: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for group in collision_groups(codes):
        ordered = group[np.lexsort((group, own[group]))]  # keeper = nearest to the centroid, then row
        movers_by_prefix[tuple(codes[ordered[0], :-1].tolist())].extend(int(r) for r in ordered[1:])

    new = codes.copy()
    moved = 0
    for prefix in sorted(movers_by_prefix):
        movers = np.array(sorted(movers_by_prefix[prefix]), dtype=np.int64)
        mover_set = set(movers.tolist())
        used = {int(codes[r, -1]) for r in prefixes[prefix] if r not in mover_set}
        free = np.array([c for c in range(n_codes) if c not in used], dtype=np.int64)
        # Greedy matching on the (movers x free codes) distance table: repeatedly take the closest
        # remaining (item, code) pair; lexsort makes ties fall to the lower row, then the lower code.
        a = last_residual[movers].astype(np.float64)  # (M, D)
        b = last_centroids[free].astype(np.float64)  # (F, D)
        dist = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]  # (M, F)
        mi, fi = np.meshgrid(np.arange(len(movers)), np.arange(len(free)), indexing="ij")
        order = np.lexsort((free[fi].ravel(), movers[mi].ravel(), dist.ravel()))
        done_items: set[int] = set()
        taken: set[int] = set()
        for flat in order:
            m, f = int(mi.flat[flat]), int(fi.flat[flat])
            if m in done_items or f in taken:
                continue
            done_items.add(m)
            taken.add(f)
            new[movers[m], -1] = free[f]
            moved += 1
            if len(done_items) == len(movers):
                break
    return new, moved
