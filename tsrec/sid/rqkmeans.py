"""Residual k-means (RQ-KMeans) quantiser for Semantic IDs (METHOD.md 1.3, "Alternative tokenizers").

Level 0 runs k-means on the item embeddings; level ``l`` runs k-means on the residual left after
subtracting the centroids chosen at levels ``0..l-1``. An item's SID codes are its nearest centroid per
level. Input: (N, D) float embeddings; output: codes (N, L) and per-level centroids (C, D).
Called by :func:`tsrec.sid.build.build_sids` (``tsrec sid build``).

Why ``faiss.Kmeans`` per level rather than ``faiss.ResidualQuantizer``:
- ``ResidualQuantizer`` codebooks have ``2**nbits`` entries; per-level ``Kmeans`` takes any size, which
  the small-catalogue clamp (:func:`effective_codebook_size`) needs: a 400-item synthetic catalogue
  cannot fill 256 codes with real clusters, so it gets 50.
- Each level's seed, iteration count and centroids are explicit, so the result is a plain function of
  (embeddings, levels, codebook size, iterations, seed, threads) and the centroids are available for
  collision resolution (:mod:`tsrec.sid.collisions`) without decoding faiss' packed codebooks.
- With beam size 1 (what MiniOneRec ships) ``ResidualQuantizer`` is the same greedy algorithm.

Determinism: same inputs, ``sid.seed`` and ``sid.threads`` give bit-identical codes and centroids. The
faiss OpenMP thread count is set for the duration of the call and restored afterwards, because
multi-threaded centroid updates sum in a thread-dependent order.

Differs from MiniOneRec: the released indices come from an RQ-VAE; tsrec builds SIDs with RQ-KMeans
(no training loop, deterministic, seconds on CPU) and resolves collisions explicitly (METHOD.md R9).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from tsrec.config import SidConfig

# Floor of the small-catalogue clamp (effective_codebook_size).
MIN_CODES = 16


@dataclass
class RQKMeansResult:
    """Codes, centroids and diagnostics of one residual k-means fit.

    Attributes:
        codes: (N, L) int64, code of item n at level l, in ``0..codebook_size-1``.
        centroids: L arrays of shape (C, D) float32.
        last_residual: (N, D) float32, the input of the last level (embedding minus the centroids of
            levels ``0..L-2``); collision resolution measures distances to last-level centroids with it.
        codebook_size: C actually used (after clamping).
        requested_codebook_size: C asked for in the config.
        mse_per_level: mean squared norm of the residual after each level (quantisation error).
    """

    codes: np.ndarray
    centroids: list[np.ndarray]
    last_residual: np.ndarray
    codebook_size: int
    requested_codebook_size: int
    mse_per_level: list[float]


def effective_codebook_size(n_items: int, requested: int, min_points_per_code: int = 0) -> int:
    """The codebook size k-means can fit on ``n_items`` points.

    ``min(requested, n_items, max(MIN_CODES, n_items // min_points_per_code))``: faiss refuses more
    centroids than points, and a centroid with one or two items is no cluster (a 400-item catalogue
    with 256 level-0 codes gets an almost one-item-per-code first level). The floor keeps tiny catalogues
    at enough last-level codes per prefix for unique SIDs. ``min_points_per_code=0`` clamps only to
    ``n_items``. Industrial (3,686 items) and Office keep 256 with the default of 8.
    """
    if n_items < 1:
        raise ValueError("residual k-means needs at least one item")
    k = min(int(requested), int(n_items))
    if min_points_per_code > 0:
        k = min(k, max(MIN_CODES, n_items // int(min_points_per_code)))
    return max(1, k)


def residual_kmeans(
    x: np.ndarray,
    levels: int = 3,
    codebook_size: int = 256,
    iters: int = 50,
    seed: int = 42,
    threads: int = 1,
    min_points_per_code: int = 0,
) -> RQKMeansResult:
    """Fit residual k-means and assign every row its per-level code.

    Args:
        x: (N, D) embeddings (any float dtype; quantised in float32).
        levels: L, the number of residual levels (SID length before collision handling).
        codebook_size: requested C per level; clamped by :func:`effective_codebook_size`.
        iters: k-means iterations per level.
        seed: k-means seed; level ``l`` uses ``seed + l`` so levels do not share initial centroids.
        threads: faiss OpenMP threads during the fit (deterministic for a fixed value).
        min_points_per_code: small-catalogue clamp, see :func:`effective_codebook_size`.

    Returns:
        :class:`RQKMeansResult`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    if levels < 1:
        raise ValueError(f"sid.levels must be >= 1, got {levels}")
    n, d = x.shape
    k = effective_codebook_size(n, codebook_size, min_points_per_code)

    previous_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(threads)))
    try:
        residual = x.copy()
        codes = np.empty((n, levels), dtype=np.int64)  # (N, L)
        centroids: list[np.ndarray] = []
        mse: list[float] = []
        last_residual = residual
        for level in range(levels):
            last_residual = residual.copy()
            # min_points_per_centroid=1: small catalogues are expected here (clamped above), so
            # faiss' "too few points" warning is noise; max_points_per_centroid keeps faiss' seeded
            # subsampling for very large catalogues.
            km = faiss.Kmeans(d, k, niter=int(iters), seed=int(seed) + level, verbose=False, min_points_per_centroid=1)
            km.train(residual)
            _, assign = km.index.search(residual, 1)  # (N, 1)
            level_codes = assign[:, 0].astype(np.int64)
            cents = np.asarray(km.centroids, dtype=np.float32).reshape(k, d)  # (C, D)
            codes[:, level] = level_codes
            centroids.append(cents)
            residual = residual - cents[level_codes]
            mse.append(float(np.mean(np.sum(residual.astype(np.float64) ** 2, axis=1))))
    finally:
        faiss.omp_set_num_threads(previous_threads)

    return RQKMeansResult(
        codes=codes,
        centroids=centroids,
        last_residual=last_residual,
        codebook_size=k,
        requested_codebook_size=int(codebook_size),
        mse_per_level=mse,
    )


def fit_rqkmeans(x: np.ndarray, cfg: SidConfig, seed: int) -> RQKMeansResult:
    """:func:`residual_kmeans` with levels, codebook size and its clamp, iterations and threads from ``cfg``."""
    return residual_kmeans(
        x,
        levels=cfg.levels,
        codebook_size=cfg.codebook_size,
        iters=cfg.kmeans_iters,
        seed=seed,
        threads=cfg.threads,
        min_points_per_code=cfg.min_points_per_code,
    )
