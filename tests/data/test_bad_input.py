"""Bad input: every error names its file, line and field; rows the paper's filter drops are counted."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tsrec.artifacts import InputError
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.data.prepare import prepare_data

# --------------------------------------------------------------------------------------------------
# amazon2018: a minimal valid pair of files (3 users x 3 items, 3-core), then one defect at a time
# --------------------------------------------------------------------------------------------------

GOOD_META = [{"asin": f"i{k}", "title": f"Item number {k}", "description": [f"about {k}"], "brand": "B"} for k in range(3)]
GOOD_REVIEWS = [{"reviewerID": f"U{u}", "asin": f"i{k}", "unixReviewTime": 1_500_000_000 + 100 * u + k} for u in range(3) for k in range(3)]


def _lines(records) -> list[str]:
    return [json.dumps(r) for r in records]


def write_amazon(folder: Path, reviews: list[str] | None = None, meta: list[str] | None = None, raw_meta: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Cat_5.json").write_text("".join(line + "\n" for line in (reviews if reviews is not None else _lines(GOOD_REVIEWS))), encoding="utf-8")
    meta_bytes = raw_meta if raw_meta is not None else "".join(line + "\n" for line in (meta if meta is not None else _lines(GOOD_META))).encode()
    (folder / "meta_Cat.json").write_bytes(meta_bytes)
    return folder


def amazon_cfg(folder: Path):
    return load_config(None, ["data.source=amazon2018", f"data.input={folder}", "data.k_core=3", "data.min_items=0",
                              "data.window_start='2017-01-01'", "data.window_end='2018-11-01'"])


def expect_error(cfg, out: Path, file: str, line: int | None, field: str | None, match: str) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        prepare_data(cfg, out)
    err = info.value
    assert Path(err.file).name == file and file in str(err)
    assert err.row == line and (line is None or f"line {line}" in str(err))
    assert err.field == field and (field is None or repr(field) in str(err))
    assert not (out / "manifest.json").exists()  # nothing half-written looks complete
    return err


def test_good_amazon_sample_passes(tmp_path):
    stats = prepare_data(amazon_cfg(write_amazon(tmp_path / "raw")), tmp_path / "out")
    assert stats["items"] == 3 and stats["users"] == 3


def test_malformed_json_line(tmp_path):
    reviews = _lines(GOOD_REVIEWS)
    reviews[2] = '{"reviewerID": "U0", "asin": "i2" "unixReviewTime": 1500000002}'  # missing comma
    expect_error(amazon_cfg(write_amazon(tmp_path / "raw", reviews=reviews)), tmp_path / "out", "Cat_5.json", 3, "asin", "malformed JSON")


def test_python_dict_meta_line_is_named(tmp_path):
    meta = _lines(GOOD_META)
    meta[1] = str(GOOD_META[1])  # {'asin': 'i1', ...}: loose, not strict JSON
    expect_error(amazon_cfg(write_amazon(tmp_path / "raw", meta=meta)), tmp_path / "out", "meta_Cat.json", 2, None, "Python dict literal")


def test_missing_and_mistyped_review_fields(tmp_path):
    reviews = _lines(GOOD_REVIEWS)
    reviews[4] = json.dumps({"reviewerID": "U1", "asin": "i1"})
    expect_error(amazon_cfg(write_amazon(tmp_path / "a", reviews=reviews)), tmp_path / "out", "Cat_5.json", 5, "unixReviewTime", "missing required field")
    reviews = _lines(GOOD_REVIEWS)
    reviews[6] = json.dumps({"reviewerID": "U2", "asin": "i0", "unixReviewTime": "1500000200"})
    expect_error(amazon_cfg(write_amazon(tmp_path / "b", reviews=reviews)), tmp_path / "out", "Cat_5.json", 7, "unixReviewTime", "expected int64")


def test_missing_title_is_a_counted_skip(tmp_path):
    meta = GOOD_META + [{"asin": "i3", "description": ["no title here"]}]
    reviews = GOOD_REVIEWS + [{"reviewerID": f"U{u}", "asin": "i3", "unixReviewTime": 1_500_000_050 + u} for u in range(3)]
    stats = prepare_data(amazon_cfg(write_amazon(tmp_path / "raw", reviews=_lines(reviews), meta=_lines(meta))), tmp_path / "out")
    assert stats["items"] == 3  # i3 is dropped by the title filter, as in the paper
    assert stats["skipped"]["meta_no_title"] == 1 and stats["skipped"]["reviews_untitled_item"] == 3


def test_empty_files(tmp_path):
    expect_error(amazon_cfg(write_amazon(tmp_path / "a", reviews=[])), tmp_path / "out", "Cat_5.json", None, None, "empty file")
    expect_error(amazon_cfg(write_amazon(tmp_path / "b", meta=[])), tmp_path / "out", "meta_Cat.json", None, None, "empty file")
    folder = write_amazon(tmp_path / "c")
    (folder / "Cat_5.json").unlink()
    (folder / "Cat_5.json.gz").write_bytes(gzip.compress(b""))
    expect_error(amazon_cfg(folder), tmp_path / "out", "Cat_5.json.gz", None, None, "empty file")


def test_non_utf8_bytes(tmp_path):
    meta = "".join(line + "\n" for line in _lines(GOOD_META)).encode()
    first, rest = meta.split(b"\n", 1)
    bad = first + b"\n" + rest.replace(b"Item number 1", b"Item \xff number 1", 1)
    expect_error(amazon_cfg(write_amazon(tmp_path / "raw", raw_meta=bad)), tmp_path / "out", "meta_Cat.json", 2, "title", "not UTF-8")


def test_missing_input_file(tmp_path):
    folder = write_amazon(tmp_path / "raw")
    (folder / "meta_Cat.json").unlink()
    expect_error(amazon_cfg(folder), tmp_path / "out", "meta_Cat.json", None, None, "missing file")


# --------------------------------------------------------------------------------------------------
# minionerec: a three-item folder in the MiniOneRec layout
# --------------------------------------------------------------------------------------------------

HEADER = "user_id,history_item_title,item_title,history_item_id,item_id,history_item_sid,item_sid"
SIDS = ["<a_1><b_1><c_1>", "<a_1><b_2><c_1>", "<a_2><b_1><c_1>"]


def write_minionerec(folder: Path, train_rows: list[str] | None = None, raw_train: bytes | None = None) -> Path:
    name = "Toy"
    items = {str(i): {"title": f"Toy item {i}", "description": f"['text {i}']" if i else "", "brand": "T", "categories": ""} for i in range(3)}
    index = {str(i): _tokens(SIDS[i]) for i in range(3)}
    (folder / "index").mkdir(parents=True)
    (folder / "index" / f"{name}.item.json").write_text(json.dumps(items, indent=2))
    (folder / "index" / f"{name}.index.json").write_text(json.dumps(index))
    (folder / "info").mkdir()
    (folder / "info" / f"{name}_5_2016-10-2018-11.txt").write_text("".join(f"{SIDS[i]}\tToy item {i}\t{i}\n" for i in range(3)))
    rows = {
        "train": train_rows if train_rows is not None else ["A0,\"['Toy item 0']\",Toy item 1,[0],1,['<a_1><b_1><c_1>'],<a_1><b_2><c_1>"],
        "valid": ["A0,\"['Toy item 0', 'Toy item 1']\",Toy item 2,\"[0, 1]\",2,\"['<a_1><b_1><c_1>', '<a_1><b_2><c_1>']\",<a_2><b_1><c_1>"],
        "test": ["A1,\"['Toy item 2']\",Toy item 0,[2],0,['<a_2><b_1><c_1>'],<a_1><b_1><c_1>"],
    }
    for split, lines in rows.items():
        (folder / split).mkdir()
        data = raw_train if (split == "train" and raw_train is not None) else "".join(line + "\n" for line in [HEADER, *lines]).encode()
        (folder / split / f"{name}_5_2016-10-2018-11.csv").write_bytes(data)
    return folder


def _tokens(sid: str) -> list[str]:
    return [t + ">" for t in sid.split(">") if t]


def mor_cfg(folder: Path):
    return load_config(None, ["data.source=minionerec", f"data.input={folder}"])


def test_good_minionerec_folder_passes(tmp_path):
    stats = prepare_data(mor_cfg(write_minionerec(tmp_path / "Toy")), tmp_path / "out")
    assert stats["items"] == 3 and stats["rows"] == {"train": 1, "valid": 1, "test": 1}


def test_unknown_item_id_in_history(tmp_path):
    rows = ["A0,\"['Toy item 0']\",Toy item 1,[0],1,['<a_1><b_1><c_1>'],<a_1><b_2><c_1>",
            "A0,\"['x', 'y']\",Toy item 2,\"[0, 7]\",2,\"['a', 'b']\",<a_2><b_1><c_1>"]
    expect_error(mor_cfg(write_minionerec(tmp_path / "Toy", train_rows=rows)), tmp_path / "out",
                 "Toy_5_2016-10-2018-11.csv", 3, "history_item_id", "unknown item id 7")


def test_unknown_target_and_bad_list(tmp_path):
    rows = ["A0,\"['Toy item 0']\",Toy item 1,[0],9,['<a_1><b_1><c_1>'],<a_1><b_2><c_1>"]
    expect_error(mor_cfg(write_minionerec(tmp_path / "a", train_rows=rows)), tmp_path / "out", "Toy_5_2016-10-2018-11.csv", 2, "item_id", "unknown item id 9")
    rows = ["A0,\"['Toy item 0']\",Toy item 1,\"[0, __import__('os')]\",1,['<a_1><b_1><c_1>'],<a_1><b_2><c_1>"]
    expect_error(mor_cfg(write_minionerec(tmp_path / "b", train_rows=rows)), tmp_path / "out", "Toy_5_2016-10-2018-11.csv", 2, "history_item_id", "list of integer")


def test_minionerec_empty_and_non_utf8_csv(tmp_path):
    expect_error(mor_cfg(write_minionerec(tmp_path / "a", raw_train=b"")), tmp_path / "out", "Toy_5_2016-10-2018-11.csv", None, None, "empty file")
    raw = (HEADER + "\nA0,\"['Toy \xff item 0']\",Toy item 1,[0],1,['<a_1><b_1><c_1>'],<a_1><b_2><c_1>\n").encode("latin-1")
    expect_error(mor_cfg(write_minionerec(tmp_path / "b", raw_train=raw)), tmp_path / "out", "Toy_5_2016-10-2018-11.csv", 2, "history_item_title", "not UTF-8")


def test_cli_reports_input_error(tmp_path, capsys):
    rows = ["A0,\"['x']\",Toy item 2,[5],2,['a'],<a_2><b_1><c_1>"]
    folder = write_minionerec(tmp_path / "Toy", train_rows=rows)
    assert main(["data", "prepare", "--source", "minionerec", "--input", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Toy_5_2016-10-2018-11.csv, line 2, field 'history_item_id'" in err
