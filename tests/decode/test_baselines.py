"""Popularity and markov baselines against hand-computed rankings and metrics on a tiny split, and their
place in ``metrics.json`` beside the model (issue 10)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tsrec.artifacts import atomic_write_json
from tsrec.config import load_config
from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA
from tsrec.decode.baselines import baseline_rankings, score_baselines

CATALOGUE = [0, 1, 2, 3, 4, 5]
# train: pop = {2: 3, 1: 2, 4: 1, 0: 0, 3: 0, 5: 0} -> popularity list 2, 1, 4, 0, 3, 5 (ties: smaller id)
# transitions (last history item -> target): 0->1, 1->2, 5->1, 3->2, 0->2, 2->4
TRAIN = {"history_item_ids": [[0], [4, 0, 1], [5], [3], [0], [2]], "item_id": [1, 2, 1, 2, 2, 4]}
# test rows: last items 0 (successors 1 and 2, one count each: 2 first, more popular), 5 (successor 1),
# 4 (never a last history item in train: popularity), 2 (successor 4)
TEST = {"history_item_ids": [[4, 0], [5], [4], [2]], "item_id": [1, 1, 0, 4]}
# popularity ranks of the targets: 1, 1, 3, 2;  markov: 1, 0, 3, 0 (K <= beams = 5)
EXPECTED = {
    "popularity": {"hr@1": 0.0, "ndcg@1": 0.0, "hr@3": 3 / 4, "ndcg@3": (2 / math.log2(3) + 1 / 2) / 4,
                   "hr@5": 1.0, "ndcg@5": (2 / math.log2(3) + 1 / 2 + 1 / math.log2(5)) / 4},
    "markov": {"hr@1": 2 / 4, "ndcg@1": 2 / 4, "hr@3": 3 / 4, "ndcg@3": (1 / math.log2(3) + 2) / 4,
               "hr@5": 1.0, "ndcg@5": (1 / math.log2(3) + 2 + 1 / math.log2(5)) / 4},
}


def _tables():
    def table(cols):
        n = len(cols["item_id"])
        return pa.table({"user_id": [f"u{i}" for i in range(n)], **cols, "timestamp": list(range(n))}, schema=SAMPLES_SCHEMA)

    return table(TRAIN), table(TEST)


def test_rankings_match_hand_computed_lists():
    train, test = _tables()
    ranked = baseline_rankings(train, test, CATALOGUE, 6)
    assert ranked["popularity"].tolist() == [[2, 1, 4, 0, 3, 5]] * 4
    assert ranked["markov"].tolist() == [
        [2, 1, 4, 0, 3, 5],  # successors of 0 (count tie: 2 is more popular than 1), then popularity back-off
        [1, 2, 4, 0, 3, 5],  # successor of 5, then popularity without 1
        [2, 1, 4, 0, 3, 5],  # 4 was never a last history item in train: popularity
        [4, 2, 1, 0, 3, 5],  # successor of 2, then popularity without 4
    ]


def test_metrics_match_hand_computed_values():
    train, test = _tables()
    got = score_baselines(train, test, CATALOGUE, ks=[1, 3, 5, 10], beams=5)  # K=10 > beams: not reported
    assert set(got) == set(EXPECTED)
    for name in EXPECTED:
        assert got[name] == pytest.approx(EXPECTED[name]), name


def test_metrics_json_holds_baselines_beside_the_model(sid_model_dir, make_catalogue, tmp_path):
    """`tsrec eval` writes the baselines, scored on the evaluated rows only (eval.max_rows)."""
    from tsrec.decode.evaluate import evaluate_local

    index = make_catalogue()
    sids = tmp_path / "sids"
    atomic_write_json(sids / "index.json", index.to_json_obj())
    data = tmp_path / "data"
    data.mkdir()
    n = len(index.items)
    pq.write_table(pa.table({"item_id": list(range(n)), "title": [f"item {i}" for i in range(n)],
                             "description": [""] * n}, schema=ITEMS_SCHEMA), data / "items.parquet")
    train, test = _tables()
    pq.write_table(train, data / "train.parquet")
    extra = pa.table({"user_id": ["x"], "history_item_ids": [[5]], "item_id": [1], "timestamp": [9]}, schema=SAMPLES_SCHEMA)
    pq.write_table(pa.concat_tables([test, extra]), data / "test.parquet")  # the 5th row is cut by max_rows
    cfg = load_config(overrides=["eval.beams=5", "eval.ks=[1,3,5]", "eval.batch_size=2", "eval.max_rows=4"])
    evaluate_local(cfg, sid_model_dir, data, sids, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # the 13-item catalogue only appends never-seen items (pop 0) after item 5: the hand values hold
    assert metrics["baselines"].keys() == {"popularity", "markov"}
    for name in ("popularity", "markov"):
        assert metrics["baselines"][name] == pytest.approx(EXPECTED[name]), name
    assert {"hr@1", "ndcg@5", "rows"} <= set(metrics) and metrics["rows"] == 4
    assert pq.read_table(tmp_path / "eval" / "rankings.parquet").column_names == [
        "row", "user_id", "item_id", "prompt", "target_sid", "ranked_sids", "scores", "hit_rank"]
