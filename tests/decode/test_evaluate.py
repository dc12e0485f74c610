"""`tsrec eval` end to end on a tiny data folder: in-process and over 2 Ray actors give identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tsrec.artifacts import InputError, atomic_write_json
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA
from tsrec.decode.metrics import first_hit_rank, ranking_metrics
from tsrec.orchestration.evaluate import run_eval, shard_rows

HISTORIES = [[0], [1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11, 12], [2], [5, 1], [11], [0, 12]]
TARGETS = [1, 3, 4, 7, 9, 0, 2, 6, 12, 10]


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory, make_catalogue):
    root = tmp_path_factory.mktemp("eval_inputs")
    index = make_catalogue()
    sids = root / "sids"
    atomic_write_json(sids / "index.json", index.to_json_obj())
    data = root / "data"
    data.mkdir()
    n = len(index.items)
    pq.write_table(pa.table({"item_id": list(range(n)), "title": [f"item {i}" for i in range(n)],
                             "description": [""] * n}, schema=ITEMS_SCHEMA), data / "items.parquet")
    pq.write_table(pa.table({"user_id": [f"A{i}" for i in range(len(TARGETS))], "history_item_ids": HISTORIES,
                             "item_id": TARGETS, "timestamp": list(range(len(TARGETS)))}, schema=SAMPLES_SCHEMA),
                   data / "test.parquet")
    return data, sids


def _read(out: Path):
    return (out / "metrics.json").read_text(), pq.read_table(out / "rankings.parquet").to_pylist()


def test_shards_fall_on_batch_boundaries():
    rows = list(range(10))
    assert shard_rows(rows, 2, 3) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert shard_rows(rows, 4, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert shard_rows(rows, 8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.ray
def test_eval_in_process_and_ray_actors_agree(ray_cluster, sid_model_dir, eval_inputs, tmp_path):
    data, sids = eval_inputs
    args = ["eval", "--model", str(sid_model_dir), "--data", str(data), "--sids", str(sids), "--split", "test",
            "--beams", "8", "eval.batch_size=3"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    metrics_text, rankings = _read(tmp_path / "local")
    metrics = json.loads(metrics_text)
    assert metrics["invalid_sids"] == 0 and metrics["empty_allowed_events"] == 0
    assert (metrics["rows"], metrics["beams"], metrics["batch_size"], metrics["split"]) == (10, 8, 3, "test")
    assert {"hr@1", "ndcg@1", "hr@3", "hr@5", "ndcg@5"} <= set(metrics) and "hr@10" not in metrics
    assert [r["row"] for r in rankings] == list(range(10))
    index = json.loads((sids / "index.json").read_text())
    catalogue = {"".join(t) for t in index.values()}
    for r, hist, target in zip(rankings, HISTORIES, TARGETS):
        assert r["target_sid"] == "".join(index[str(target)])
        assert "".join(index[str(hist[-1])]) in r["prompt"] and r["prompt"].endswith("### Response:\n")
        assert len(r["ranked_sids"]) == 8 == len(set(r["ranked_sids"])) and set(r["ranked_sids"]) <= catalogue
        assert r["scores"] == sorted(r["scores"], reverse=True)
        hit = first_hit_rank(r["ranked_sids"], r["target_sid"])
        assert r["hit_rank"] == (-1 if hit is None else hit)
    ranks = [None if r["hit_rank"] < 0 else r["hit_rank"] for r in rankings]
    for key, value in ranking_metrics(ranks, [1, 3, 5], 8).items():
        assert metrics[key] == pytest.approx(value)
    assert json.loads((tmp_path / "local" / "manifest.json").read_text())["stage"] == "eval"

    cfg = load_config(overrides=["eval.beams=8", "eval.batch_size=3", "resources.eval.workers=2"])
    result = run_eval(cfg, sid_model_dir, data, sids, tmp_path / "ray")
    assert result["workers"] == 2
    assert _read(tmp_path / "ray") == (metrics_text, rankings)  # identical metrics.json bytes and rankings


def test_eval_rejects_items_without_sid(sid_model_dir, eval_inputs, tmp_path):
    data, sids = eval_inputs
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "items.parquet").write_bytes((data / "items.parquet").read_bytes())
    pq.write_table(pa.table({"user_id": ["A0"], "history_item_ids": [[0, 999]], "item_id": [1], "timestamp": [0]},
                            schema=SAMPLES_SCHEMA), bad / "test.parquet")
    cfg = load_config(overrides=["eval.beams=4"])
    with pytest.raises(InputError, match=r"test.parquet, line 1, field 'history_item_ids': item id 999 has no SID"):
        run_eval(cfg, sid_model_dir, bad, sids, tmp_path / "out")
