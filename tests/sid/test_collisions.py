"""Collision resolution (METHOD.md R9): both modes give unique SIDs; reassign moves to the nearest free code."""

from __future__ import annotations

import numpy as np
import pytest

from tsrec.sid.collisions import CollisionError, collision_groups, collision_stats, resolve_collisions

# 4 last-level centroids on a line, 1-d residuals.
CENTROIDS = np.array([[0.0], [10.0], [20.0], [30.0]], dtype=np.float32)


def _case():
    """Forced collisions: items 0, 1, 2 share (0, 0, 1); items 3, 4 share (1, 2, 3); item 5 is alone."""
    codes = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 1], [1, 2, 3], [1, 2, 3], [0, 0, 2]], dtype=np.int64)
    residual = np.array([[12.0], [9.5], [4.0], [31.0], [30.5], [20.0]], dtype=np.float32)
    return codes, residual


def test_collision_stats_and_groups():
    codes, _ = _case()
    assert [g.tolist() for g in collision_groups(codes)] == [[0, 1, 2], [3, 4]]
    assert collision_stats(codes) == {"unique_sids": 3, "collision_groups": 2, "collision_items": 5, "largest_group": 3}


def test_reassign_moves_to_nearest_free_code_under_same_prefix():
    codes, residual = _case()
    new, moved = resolve_collisions(codes, residual, CENTROIDS, "reassign")
    assert collision_stats(new)["collision_groups"] == 0 and moved == 3
    # Prefixes never change; SID length stays 3.
    np.testing.assert_array_equal(new[:, :2], codes[:, :2])
    # Group (0,0,1): item 1 (9.5) is nearest to centroid 1 and keeps it. Code 2 is taken by item 5 under
    # the same prefix, so the free codes are 0 and 3: item 2 (4.0) -> 0, item 0 (12.0) -> 3.
    # Group (1,2,3): item 4 (30.5) keeps 3; item 3 (31.0) takes the nearest free code 2 under (1,2).
    assert new[:, 2].tolist() == [3, 1, 0, 2, 3, 2]


def test_extra_level_ranks_within_group():
    codes, residual = _case()
    new, moved = resolve_collisions(codes, residual, CENTROIDS, "extra_level")
    assert new.shape == (6, 4) and moved == 0
    np.testing.assert_array_equal(new[:, :3], codes)
    # Rank by distance to the group's last-level centroid: item 1 first, then 0, then 2; singletons 0.
    assert new[:, 3].tolist() == [1, 0, 2, 1, 0, 0]
    assert collision_stats(new)["collision_groups"] == 0


def test_reassign_fails_clearly_when_prefix_is_overfull():
    codes = np.zeros((5, 3), dtype=np.int64)  # 5 items, one prefix, 4 last-level codes
    residual = np.arange(5, dtype=np.float32)[:, None]
    with pytest.raises(CollisionError, match="extra_level"):
        resolve_collisions(codes, residual, CENTROIDS, "reassign")
    new, _ = resolve_collisions(codes, residual, CENTROIDS, "extra_level")
    assert len({tuple(r) for r in new.tolist()}) == 5


def test_random_heavy_collisions_are_resolved_deterministically():
    rng = np.random.default_rng(0)
    cents = rng.normal(size=(16, 8)).astype(np.float32)
    codes = np.stack([rng.integers(0, 8, 200), rng.integers(0, 4, 200), rng.integers(0, 16, 200)], axis=1)
    residual = rng.normal(size=(200, 8)).astype(np.float32)
    assert collision_stats(codes)["collision_groups"] > 0
    for mode in ("reassign", "extra_level"):
        a, _ = resolve_collisions(codes, residual, cents, mode)
        b, _ = resolve_collisions(codes.copy(), residual.copy(), cents, mode)
        assert collision_stats(a)["collision_groups"] == 0
        np.testing.assert_array_equal(a, b)
