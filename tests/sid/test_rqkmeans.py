"""Residual k-means (METHOD.md 1.3): shapes, residual structure, determinism, small-catalogue clamp."""

from __future__ import annotations

import numpy as np

from tsrec.config import load_config
from tsrec.sid.rqkmeans import effective_codebook_size, fit_rqkmeans, residual_kmeans


def _clustered(n: int = 600, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(12, d))
    return (centres[rng.integers(0, 12, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_codes_centroids_and_residual_structure():
    x = _clustered()
    rq = residual_kmeans(x, levels=3, codebook_size=16, iters=10, seed=3)
    assert rq.codes.shape == (600, 3) and rq.codes.dtype == np.int64
    assert rq.codes.min() >= 0 and rq.codes.max() < 16
    assert [c.shape for c in rq.centroids] == [(16, 16)] * 3
    # Every level's code is the nearest centroid to that level's residual.
    residual = x.astype(np.float32)
    for level, cents in enumerate(rq.centroids):
        dist = ((residual[:, None, :] - cents[None]) ** 2).sum(-1)
        picked = dist[np.arange(len(x)), rq.codes[:, level]]
        np.testing.assert_allclose(picked, dist.min(axis=1), rtol=1e-4, atol=1e-4)
        if level == 2:
            np.testing.assert_allclose(rq.last_residual, residual, atol=1e-5)
        residual = residual - cents[rq.codes[:, level]]
    # Each level lowers the quantisation error.
    assert rq.mse_per_level[0] > rq.mse_per_level[1] > rq.mse_per_level[2]


def test_same_seed_same_result_other_seed_differs():
    x = _clustered()
    cfg = load_config(None, ["sid.codebook_size=32", "sid.kmeans_iters=15", "sid.threads=1"]).sid
    a, b = fit_rqkmeans(x, cfg, seed=7), fit_rqkmeans(x, cfg, seed=7)
    assert a.codes.tobytes() == b.codes.tobytes()
    assert all(p.tobytes() == q.tobytes() for p, q in zip(a.centroids, b.centroids))
    c = fit_rqkmeans(x, cfg, seed=8)
    assert not all(p.tobytes() == q.tobytes() for p, q in zip(a.centroids, c.centroids))


def test_small_catalogue_clamps_codebook_size():
    assert effective_codebook_size(3686, 256) == 256
    assert effective_codebook_size(40, 256) == 40  # at most one code per item
    # Default sid.min_points_per_code=8: Industrial keeps 256; small catalogues get real clusters.
    assert effective_codebook_size(3686, 256, 8) == 256
    assert effective_codebook_size(400, 256, 8) == 50
    assert effective_codebook_size(40, 256, 8) == 16  # floor: enough last-level codes per prefix
    assert effective_codebook_size(10, 256, 8) == 10
    rq = residual_kmeans(_clustered(n=40), levels=3, codebook_size=256, iters=5, seed=0)
    assert rq.codebook_size == 40 and rq.requested_codebook_size == 256
    assert rq.codes.max() < 40
