"""SASRec baseline (issue 21): it learns a deterministic next-item rule, it is causal, early stopping keeps the
best valid epoch, and ``eval.sasrec=true`` adds its row to ``metrics.json`` and the report and reuses its cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tsrec.artifacts import atomic_write_json
from tsrec.config import load_config
from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA
from tsrec.decode import sasrec
from tsrec.decode.metrics import hit_rate_at_k, ndcg_at_k, ranking_metrics
from tsrec.decode.sasrec import SASRec, SasrecSettings, fit_and_rank, full_ranks, train_sasrec


def _rule_rows(n_rows: int, n_items: int, seed: int, max_len: int = 5, noise: float = 0.0):
    """Histories of 1..max_len consecutive items (mod n_items); target = last + 1 mod n_items (or random with
    probability ``noise``)."""
    rng = random.Random(seed)
    hist, tgt = [], []
    for _ in range(n_rows):
        start, n = rng.randrange(n_items), rng.randint(1, max_len)
        h = [(start + i) % n_items for i in range(n)]
        hist.append(h)
        tgt.append(rng.randrange(n_items) if rng.random() < noise else (h[-1] + 1) % n_items)
    return hist, tgt


def _write_data(folder, n_items: int, splits: dict[str, tuple[list, list]]):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"item_id": list(range(n_items)), "title": [f"item {i}" for i in range(n_items)],
                             "description": [""] * n_items}, schema=ITEMS_SCHEMA), folder / "items.parquet")
    for name, (h, t) in splits.items():
        pq.write_table(pa.table({"user_id": [f"u{i}" for i in range(len(t))], "history_item_ids": h, "item_id": t,
                                 "timestamp": list(range(len(t)))}, schema=SAMPLES_SCHEMA), folder / f"{name}.parquet")


def test_learns_next_item_rule_to_hr1_near_one(tmp_path):
    n = 30
    data = tmp_path / "data"
    _write_data(data, n, {"train": _rule_rows(600, n, 0), "valid": _rule_rows(200, n, 1),
                          "test": _rule_rows(300, n, 2)})
    s = SasrecSettings(hidden=32, blocks=1, dropout=0.0, lr=1e-2, batch_size=64, epochs=5, patience=2)
    res = fit_and_rank(data, s)
    test_ranks = res["ranks"]["test"]
    assert len(test_ranks) == 300 and res["max_len"] == 5
    assert hit_rate_at_k(test_ranks, 1) >= 0.95, (hit_rate_at_k(test_ranks, 1), res["valid_ndcg@10"])
    # a seeded rerun gives the same ranks (1 thread, CPU)
    assert fit_and_rank(data, s)["ranks"] == res["ranks"]


def test_ranks_are_full_catalogue_ranks_with_id_tie_break():
    model = SASRec(n_items=6, max_len=3, hidden=8, blocks=1)
    with torch.no_grad():
        model.item.weight.zero_()  # every item scores 0: the rank is the number of smaller ids
    seq = torch.tensor([[0, 1, 2], [0, 0, 3], [4, 5, 6]])
    assert full_ranks(model, seq, torch.tensor([0, 3, 5])).tolist() == [0, 3, 5]
    with torch.no_grad():
        model.item.weight[1:] = torch.randn(6, 8)
    scores = model(seq)
    expected = [int((scores[i] > scores[i, t]).sum()) for i, t in enumerate([0, 3, 5])]
    assert full_ranks(model, seq, torch.tensor([0, 3, 5])).tolist() == expected


def test_attention_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = SASRec(n_items=20, max_len=6, hidden=16, blocks=2, heads=2, dropout=0.0).eval()
    with torch.no_grad():
        a = model.states(torch.tensor([[0, 0, 3, 4, 5, 6]]))
        b = model.states(torch.tensor([[0, 0, 3, 4, 9, 1]]))  # only the last two positions differ
        c = model.states(torch.tensor([[3, 4, 5, 6]]))  # the same history without the padding
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-6), "an earlier position saw a later item"
    assert not torch.allclose(a[0, 4:], b[0, 4:])
    assert torch.allclose(a[0, 2:], c[0], atol=1e-6), "the padding changed the outputs"


def test_early_stopping_keeps_the_best_valid_epoch():
    """Noisy train targets and a large learning rate: valid NDCG@10 peaks, then falls; the model returned is
    the best epoch's (its valid NDCG@10 is the curve's maximum), and training stops ``patience`` epochs later."""
    n = 40
    cat = np.arange(n)

    def tensors(rows):
        return sasrec._encode(rows[0], cat, 5, "x"), torch.tensor(rows[1])

    train, valid = tensors(_rule_rows(300, n, 3, noise=0.6)), tensors(_rule_rows(200, n, 4))
    s = SasrecSettings(hidden=64, blocks=2, dropout=0.0, lr=2e-2, batch_size=32, epochs=60, patience=4)
    with sasrec._threads(1):
        model, info = train_sasrec(train, valid, n, s)
    curve, best = info["valid_ndcg@10"], info["best_epoch"]
    assert info["epochs_run"] == len(curve) < s.epochs, "did not stop early"
    assert best == int(np.argmax(curve)) + 1 and best == len(curve) - s.patience
    assert max(curve[best:]) < curve[best - 1], curve
    got = ndcg_at_k(full_ranks(model, *valid).tolist(), 10)
    assert got == pytest.approx(curve[best - 1], abs=1e-6), (got, curve)


def test_eval_with_sasrec_adds_the_row_and_reuses_its_cache(sid_model_dir, make_catalogue, tmp_path, monkeypatch):
    from tsrec.decode.evaluate import evaluate_local
    from tsrec.report import build, collect_metrics, console_summary, render_markdown

    index = make_catalogue()
    sids = tmp_path / "sids"
    atomic_write_json(sids / "index.json", index.to_json_obj())
    n = len(index.items)
    root = tmp_path / "run"
    data = root / "data"
    _write_data(data, n, {"train": _rule_rows(200, n, 5, max_len=3), "valid": _rule_rows(30, n, 6, max_len=3),
                          "test": _rule_rows(6, n, 7, max_len=3)})
    over = ["eval.beams=5", "eval.ks=[1,3,5]", "eval.batch_size=3", "eval.max_rows=4", "eval.sasrec=true",
            "eval.sasrec_epochs=6", "eval.sasrec_patience=2", "eval.sasrec_hidden=16", "eval.sasrec_blocks=1"]
    out = root / "eval"
    evaluate_local(load_config(overrides=over), sid_model_dir, data, sids, out)
    first = (out / "metrics.json").read_bytes()
    metrics = json.loads(first)
    base = metrics["baselines"]
    assert set(base) == {"popularity", "markov", "sasrec"} and set(base["sasrec"]) == set(base["popularity"])
    cache = json.loads((out / "sasrec.json").read_text())
    assert cache["settings"]["hidden"] == 16 and cache["settings"]["epochs"] == 6
    # scored on the 4 evaluated rows only (eval.max_rows), with the model's metric definitions
    assert base["sasrec"] == ranking_metrics(cache["ranks"]["test"][:4], [1, 3, 5], 5)

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(sasrec, "train_sasrec", no_training)
    evaluate_local(load_config(overrides=over), sid_model_dir, data, sids, out)
    assert (out / "metrics.json").read_bytes() == first  # from the cache, byte for byte
    with pytest.raises(AssertionError, match="trained again"):  # another setting is another key
        evaluate_local(load_config(overrides=[*over, "eval.sasrec_hidden=8"]), sid_model_dir, data, sids, out)

    m = collect_metrics(root)
    names = [r["name"] for r in m["rows"]]
    assert names == ["tsrec (model)", "popularity (baseline)", "markov (baseline)", "sasrec (baseline, trained here)"]
    text = render_markdown(build(root), [], root)
    assert "| sasrec (baseline, trained here) |" in text
    assert "1 block(s), hidden 16" in text and f"trained in {cache['train_seconds']} s on 1 CPU thread" in text
    assert "sasrec (baseline, trained here)" in console_summary(root)
