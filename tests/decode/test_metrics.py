"""HR@K and NDCG@K against hand-computed values (METHOD.md 1.8): rank 0, a middle rank, a miss."""

from __future__ import annotations

import math

import pytest

from tsrec.decode.metrics import first_hit_rank, hit_rate_at_k, invalid_count, ndcg_at_k, ranking_metrics
from tsrec.decode.reference import compare_topk


def test_hand_computed_ranking():
    target = "<a_1><b_1><c_1>"
    ranked = [
        [target, "<a_2><b_2><c_2>", "<a_3><b_3><c_3>"],  # rank 0
        ["<a_2><b_2><c_2>", "<a_3><b_3><c_3>", target],  # rank 2 (mid)
        ["<a_2><b_2><c_2>", "<a_3><b_3><c_3>", "<a_4><b_4><c_4>"],  # miss
        ["<a_2><b_2><c_2>", target, target],  # first hit counts: rank 1
    ]
    ranks = [first_hit_rank(r, target) for r in ranked]
    assert ranks == [0, 2, None, 1]
    assert hit_rate_at_k(ranks, 1) == 0.25
    assert hit_rate_at_k(ranks, 2) == 0.5
    assert hit_rate_at_k(ranks, 3) == 0.75
    assert ndcg_at_k(ranks, 1) == pytest.approx(1 / 4)
    assert ndcg_at_k(ranks, 2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert ndcg_at_k(ranks, 3) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 4)  # 1/log2(4) = 0.5
    assert ndcg_at_k(ranks, 3) == pytest.approx((1 + 0.6309297535714575 + 0.5) / 4)
    m = ranking_metrics(ranks, ks=[1, 3, 5, 10, 20], beams=3)
    assert list(m) == ["hr@1", "ndcg@1", "hr@3", "ndcg@3"]  # K <= beam width only
    assert m["hr@3"] == 0.75
    assert invalid_count(ranked, valid={target, "<a_2><b_2><c_2>", "<a_3><b_3><c_3>"}) == 1  # every beam counted
    assert first_hit_rank(["<a_1><b_1><c_11>"], target) is None  # exact string match, no prefix match
    with pytest.raises(ValueError):
        hit_rate_at_k([], 1)


def test_compare_topk_separates_near_ties_from_real_mismatches():
    a, b, c, d = "<a_1><b_1><c_1>", "<a_1><b_1><c_2>", "<a_2><b_1><c_1>", "<a_3><b_1><c_1>"
    tol = 1e-4
    assert compare_topk([a, b, c], [-1.0, -2.0, -3.0], [a, b, c], [-1.0, -2.0, -3.0], tol) == "identical"
    # b and c tie up to rounding (gap 7.6e-6): the two decoders order them differently -> near-tie
    assert compare_topk([a, b, c], [-1.0, -2.0, -2.0000076], [a, c, b], [-1.0, -2.000001, -2.0000071], tol) == "near-tie"
    # the last slot holds a different SID, equal in score within tol (a tie at the K boundary)
    assert compare_topk([a, b, c], [-1.0, -2.0, -3.0], [a, b, d], [-1.0, -2.0, -3.00005], tol) == "near-tie"
    # a swap with a real score gap, or a different SID at a different score: real mismatches
    assert compare_topk([a, b, c], [-1.0, -2.0, -3.0], [a, c, b], [-1.0, -3.0, -2.0], tol) == "mismatch"
    assert compare_topk([a, b, c], [-1.0, -2.0, -3.0], [a, b, d], [-1.0, -2.0, -3.5], tol) == "mismatch"
    # same SIDs at the same ranks-scores but one decoder scores a shared SID differently
    assert compare_topk([a, b, c], [-1.0, -2.0, -2.0], [a, c, b], [-1.0, -2.0, -2.0], tol) == "near-tie"
    assert compare_topk([a, b, c], [-1.0, -2.0, -2.0], [b, a, c], [-1.0, -2.0, -2.0], tol) == "mismatch"
    assert compare_topk([a, b], [-1.0, -2.0], [a], [-1.0], tol) == "mismatch"
