"""synthetic source: deterministic, schema-conformant, and carrying the category signal it promises."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tsrec.cli import main
from tsrec.config import ConfigError, load_config
from tsrec.data.prepare import prepare_data
from tsrec.data.samples import make_samples, split_bounds
from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA, SPLITS, read_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    stats = prepare_data(load_config(), out)
    return out, stats


def test_schema_and_sizes(demo):
    out, stats = demo
    ds = read_dataset(out)
    assert ds.num_items == 400 and stats["users"] <= 600
    for f in ITEMS_SCHEMA:
        assert ds.items.schema.field(f.name).type == f.type
    assert {"brand", "category"} <= set(ds.items.column_names)
    assert len(set(ds.titles())) == 400  # unique, real-looking titles
    assert all(5 <= len(t.split()) <= 20 for t in ds.titles())
    n = sum(t.num_rows for t in ds.splits.values())
    assert n == stats["interactions"] - 600  # one sample per interaction after each user's first
    train_end, valid_end = split_bounds(n, [0.8, 0.1, 0.1])
    assert [ds.splits[s].num_rows for s in SPLITS] == [train_end, valid_end - train_end, n - valid_end]
    times = np.concatenate([ds.splits[s].column("timestamp").to_numpy() for s in SPLITS])
    assert (np.diff(times) >= 0).all()  # global chronological split
    for table in ds.splits.values():
        assert table.schema.equals(SAMPLES_SCHEMA)
        hist = table.column("history_item_ids").to_pylist()
        assert all(1 <= len(h) <= 10 for h in hist)
        ids = table.column("item_id").to_numpy()
        assert ids.min() >= 0 and ids.max() < 400


def test_sequences_follow_categories(demo):
    out, _ = demo
    ds = read_dataset(out)
    category = np.array(ds.items.column("category").to_pylist())
    assert len(set(category)) == 8
    train = ds.splits["train"].to_pydict()
    same = [category[h[-1]] == category[t] for h, t in zip(train["history_item_ids"], train["item_id"])]
    # stay_prob = 0.85 -> about 85% of next items share the last item's category (chance would be 1/8)
    assert 0.75 < np.mean(same) < 0.95


def test_deterministic_for_a_seed(tmp_path):
    small = ["data.synthetic.n_items=60", "data.synthetic.n_users=50"]
    prepare_data(load_config(None, small + ["run.seed=3"]), tmp_path / "a")
    prepare_data(load_config(None, small + ["run.seed=3"]), tmp_path / "b")
    prepare_data(load_config(None, small + ["run.seed=4"]), tmp_path / "c")
    for name in ("items", "train", "valid", "test"):
        a, b, c = (pq.read_table(tmp_path / d / f"{name}.parquet") for d in "abc")
        assert a.equals(b)
        assert not a.equals(c)


def test_bad_synthetic_config(tmp_path):
    with pytest.raises(ConfigError, match="n_items"):
        prepare_data(load_config(None, ["data.synthetic.n_items=3"]), tmp_path / "x")
    with pytest.raises(ConfigError, match="data.split"):
        prepare_data(load_config(None, ["data.split=[0.5,0.1,0.1]"]), tmp_path / "x")


def test_make_samples_by_hand():
    # user 0: items 5, 6, 7 at t 10, 30, 40; user 1: items 8, 5 at t 20, 30; history capped at 1
    t = make_samples(np.array([0, 0, 0, 1, 1]), np.array([5, 6, 7, 8, 5]), np.array([10, 30, 40, 20, 30]), max_history=1)
    assert t.to_pydict() == {
        "user_id": ["A0", "A1", "A0"],  # t=30 tie: user 0 first
        "history_item_ids": [[5], [8], [6]],
        "item_id": [6, 5, 7],
        "timestamp": [30, 30, 40],
    }
    assert split_bounds(45324, [0.8, 0.1, 0.1]) == (36259, 40791)  # Industrial: 36,259 / 4,532 / 4,533


def test_cli_module_entrypoint(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "tsrec", "data", "prepare", "--source", "synthetic", "--out", str(out),
           "data.synthetic.n_items=40", "data.synthetic.n_users=30"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"items": 40' in done.stdout and (out / "manifest.json").exists()
    # a bad input is exit code 2 with the file named
    assert main(["data", "prepare", "--source", "minionerec", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
