"""`tsrec eval` end to end on a tiny data folder: in-process and over 2 Ray actors give identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tsrec import prompts
from tsrec.artifacts import InputError, atomic_write_json
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA
from tsrec.decode.constraints import SidConstraints
from tsrec.decode.evaluate import (
    SuffixScoringError,
    build_prompt_texts,
    compute_metrics,
    decode_rows,
    resolve_dtype,
    score_suffix_enabled,
    upstream_suffix_ids,
)
from tsrec.decode.metrics import first_hit_rank, ranking_metrics
from tsrec.decode.reference import exhaustive_scores
from tsrec.orchestration.evaluate import EvalPlacementError, resolve_eval_placement, run_eval, shard_rows

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


def _prepared(index, mode="canonical"):
    rows = [{"row": i, "user_id": f"A{i}", "history_item_ids": h, "item_id": t}
            for i, (h, t) in enumerate(zip(HISTORIES[:4], TARGETS[:4]))]
    return build_prompt_texts(rows, index, mode)


def test_invalid_count_uses_the_decoded_ids(sid_model, make_catalogue):
    """A corrupt table must make ``invalid_sids`` non-zero (it used to be read back from the leaf id)."""
    model, tok = sid_model
    index = make_catalogue()
    cons = SidConstraints.from_index(index, tok)
    valid = set(index.sids().values())
    cfg = load_config(overrides=["eval.beams=12", "eval.batch_size=2"])
    assert compute_metrics(cfg, decode_rows(cfg, model, tok, cons, _prepared(index), "float32"), valid)["invalid_sids"] == 0

    # 1. Leaves 0 and 1 swapped: every beam decodes a catalogue SID, but two beams per row land on the
    #    wrong leaf id (the strings from constraints.sids would all look valid).
    swapped = SidConstraints(**{**cons.__dict__, "children": [t.clone() for t in cons.children]})
    last = swapped.children[-1]
    a, b = (last == 0).nonzero()[0], (last == 1).nonzero()[0]
    last[tuple(a)], last[tuple(b)] = 1, 0
    res = decode_rows(cfg, model, tok, swapped, _prepared(index), "float32")
    assert all(set(r["ranked_sids"]) <= valid for r in res)
    assert compute_metrics(cfg, res, valid)["invalid_sids"] == 2 * len(res)

    # 2. A leaf moved to a code its prefix does not have: the decoded SID is not in the catalogue.
    moved = SidConstraints(**{**cons.__dict__, "children": [t.clone() for t in cons.children]})
    last = moved.children[-1]
    node, code = (last == 0).nonzero()[0].tolist()
    free = int((last[node] < 0).nonzero()[0])
    last[node, free], last[node, code] = 0, -1
    res = decode_rows(cfg, model, tok, moved, _prepared(index), "float32")
    metrics = compute_metrics(cfg, res, valid)
    assert metrics["invalid_sids"] == len(res)
    assert all(sum(s not in valid for s in r["ranked_sids"]) == 1 for r in res)


def test_upstream_mode_scores_newline_and_eos(sid_model, make_catalogue):
    model, tok = sid_model
    index = make_catalogue()
    cons = SidConstraints.from_index(index, tok)
    suffix = [*tok("\n", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    up = load_config(overrides=["eval.beams=12", "eval.batch_size=4", "prompts.mode=upstream"])
    assert score_suffix_enabled(up) and upstream_suffix_ids(tok, cons) == suffix
    prepared = _prepared(index, "upstream")
    res = decode_rows(up, model, tok, cons, prepared, "float32")
    for r, p in zip(res, prepared):  # beams = every SID: the ranking is exhaustive scoring with "\n" + EOS
        truth = exhaustive_scores(model, prompts.encode_prompt(tok, p["_sample"]), cons, suffix_ids=suffix)
        order = torch.argsort(truth, descending=True, stable=True)
        assert r["ranked_sids"] == [cons.sids[i] for i in order.tolist()]
        torch.testing.assert_close(torch.tensor(r["scores"]), truth[order], atol=1e-4, rtol=0)
    assert compute_metrics(up, res, set(index.sids().values()))["score_suffix"] is True
    # Opt-out in upstream mode; canonical never scores the suffix and refuses to be asked to.
    assert not score_suffix_enabled(load_config(overrides=["prompts.mode=upstream", "eval.score_suffix=false"]))
    assert not score_suffix_enabled(load_config())
    with pytest.raises(SuffixScoringError, match="needs prompts.mode=upstream"):
        score_suffix_enabled(load_config(overrides=["eval.score_suffix=true"]))


def test_eval_dtype_and_gpu_placement_defaults():
    cfg = load_config()
    assert cfg.eval.dtype == "auto" and cfg.resources.eval.gpus_per_worker is None
    assert resolve_dtype("auto", "cuda") == "bfloat16" and resolve_dtype("auto", "cuda:1") == "bfloat16"
    assert resolve_dtype("auto", "cpu") == "float32" and resolve_dtype("float32", "cuda") == "float32"
    # default: one GPU per actor on a GPU cluster, else a CPU actor that says so explicitly
    assert resolve_eval_placement(None, "auto", cluster_gpus=8) == (1.0, "auto")
    assert resolve_eval_placement(None, "auto", cluster_gpus=0) == (0.0, "cpu")
    assert resolve_eval_placement(0, "auto", cluster_gpus=8) == (0.0, "cpu")  # asked for CPU actors on a GPU cluster
    assert resolve_eval_placement(0.5, "auto", cluster_gpus=1) == (0.5, "auto")  # explicit sharing is allowed
    assert resolve_eval_placement(0, "cpu", cluster_gpus=0) == (0.0, "cpu")
    with pytest.raises(EvalPlacementError, match="would share it"):
        resolve_eval_placement(0, "cuda", cluster_gpus=8)
    with pytest.raises(EvalPlacementError, match="would share it"):
        resolve_eval_placement(None, "cuda:0", cluster_gpus=0)
