"""minionerec source on the shared Industrial_and_Scientific folder, checked row for row against the
CSVs read independently with the csv module (METHOD.md 2.2-2.4)."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tsrec.artifacts import InputError
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.data.prepare import prepare_data
from tsrec.data.schema import read_dataset

CSV_NAME = "Industrial_and_Scientific_5_2016-10-2018-11.csv"
# Same location as tests/conftest.py's INDUSTRIAL (conftest modules are not importable by name).
INDUSTRIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon" / "Industrial_and_Scientific"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="module")
def industrial(tmp_path_factory):
    folder = require_shared(INDUSTRIAL)
    out = tmp_path_factory.mktemp("industrial") / "data"
    # through the real CLI, exactly the acceptance command
    assert main(["data", "prepare", "--source", "minionerec", "--input", str(folder), "--out", str(out)]) == 0
    return folder, out


def test_counts(industrial):
    _, out = industrial
    ds = read_dataset(out)
    assert ds.num_items == 3686
    assert {s: t.num_rows for s, t in ds.splits.items()} == {"train": 36259, "valid": 4532, "test": 4533}
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["users"] == 7694 and stats["items"] == 3686 and stats["missing_splits"] == []


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_rows_match_csv(industrial, split):
    folder, out = industrial
    with open(folder / split / CSV_NAME, newline="", encoding="utf-8") as f:
        expected = [(r["user_id"], ast.literal_eval(r["history_item_id"]), int(r["item_id"])) for r in csv.DictReader(f)]
    got = pq.read_table(out / f"{split}.parquet").to_pydict()
    assert list(zip(got["user_id"], got["history_item_ids"], got["item_id"])) == expected
    assert set(got["timestamp"]) == {-1}


def test_items_match_json(industrial):
    folder, out = industrial
    raw = json.loads((folder / "index" / "Industrial_and_Scientific.item.json").read_text(encoding="utf-8"))
    index = json.loads((folder / "index" / "Industrial_and_Scientific.index.json").read_text(encoding="utf-8"))
    items = pq.read_table(out / "items.parquet").to_pydict()
    assert items["item_id"] == list(range(3686))
    assert items["title"] == [raw[str(i)]["title"] for i in range(3686)]
    assert items["description_raw"] == [raw[str(i)]["description"] for i in range(3686)]
    assert items["brand"] == [raw[str(i)]["brand"] for i in range(3686)]
    assert items["sid"] == ["".join(index[str(i)]) for i in range(3686)]
    assert sum(1 for d in items["description_raw"] if not d) == 229  # METHOD.md 2.4: items without description
    assert sum(1 for d in items["description"] if not d) == 232  # plus 3 whose list holds only blanks: "['', ' ']"
    # the description is plain text: the list brackets and quotes are gone
    one = items["description"][1]
    assert one.startswith("Heavy-duty staples are ideal") and "', '" not in one and not one.startswith("[")


def test_missing_split_is_an_error_unless_allowed(tmp_path):
    folder = require_shared(INDUSTRIAL)
    partial = tmp_path / "Industrial_and_Scientific"
    for sub in ("index", "info", "valid", "test"):  # like Office_Products: no train/
        (partial / sub).mkdir(parents=True)
        for f in (folder / sub).iterdir():
            (partial / sub / f.name).symlink_to(f)
    cfg = load_config(None, ["data.source=minionerec", f"data.input={partial}"])
    with pytest.raises(InputError, match=r"train.*missing split file"):
        prepare_data(cfg, tmp_path / "out")
    cfg.data.allow_missing_splits = True
    stats = prepare_data(cfg, tmp_path / "out")
    assert stats["missing_splits"] == ["train"] and stats["rows"] == {"train": 0, "valid": 4532, "test": 4533}
