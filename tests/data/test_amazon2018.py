"""amazon2018 source against a raw sample whose expected output was worked out by hand (METHOD.md 1.1).

The sample (k_core=3, window 2017-01-01..2017-12-31, min_items=0):
- meta: valid titles i1..i6 (with &amp;/&quot;/quotes to clean), rows failing each title rule, i1 listed
  twice with valid titles (the last wins), i2 listed again without a title (ignored, counted);
- reviews: U1 has 12 in-window reviews (the 11th history is cut to 10); U5 has 2 reviews and falls in
  k-core pass 1, which drops i5 in pass 2 and U4, U6 in pass 3 (pass 4 is stable); reviews before the
  window, after it, on the inclusive end day, of unknown and of filtered items; a same-time tie.
Hand computation: users by first surviving review in file order: U2=A0, U1=A1, U3=A2; items by first
appearance walking A0, A1, A2 in time order: i3=0, i1=1, i2=2, i4=3.
"""

from __future__ import annotations

import calendar
import datetime as dt
import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tsrec.config import load_config
from tsrec.data.prepare import prepare_data

DAY0 = calendar.timegm(dt.date(2017, 1, 1).timetuple())


def T(day: int) -> int:
    return DAY0 + day * 86_400


META = [
    {"asin": "i1", "title": "Alpha Staples", "description": ["old"], "brand": "Old"},
    {"asin": "i2", "title": "Beta &amp; Glue", "description": [], "brand": "B"},
    {"asin": "i3", "title": '  "Gamma Tape"  ', "brand": "G"},
    {"asin": "i4", "title": "Delta &quot;Pro&quot; Meter", "description": ["Reads volts.", "  "], "brand": "D"},
    {"asin": "i5", "title": "Epsilon Gloves", "description": ["x"], "brand": "E"},
    {"asin": "i6", "title": "Zeta Beaker", "description": ["y"], "brand": "Z"},
    {"asin": "x_notitle", "description": ["no title"]},
    {"asin": "x_span", "title": '<span id="a">Bad</span> Title'},
    {"asin": "x_short", "title": "A"},
    {"asin": "x_long", "title": " ".join(f"w{i}" for i in range(21))},
    {"asin": "x_20words", "title": " ".join(f"w{i}" for i in range(20))},
    {"asin": "i1", "title": "Alpha Staples v2", "description": ["<b>Heavy-duty</b> staples", "For  roofing &amp; felt."], "brand": "by\nStanley"},
    {"asin": "i2", "description": ["a later row without title"]},
]

REVIEWS = [  # (user, asin, day) in file order
    ("U2", "i3", 10), ("U2", "i1", 10),  # same time: file order decides (i3 first)
    ("U1", "i1", 1), ("U1", "i2", 2), ("U1", "i3", 3), ("U1", "i4", 4), ("U1", "i1", 5), ("U1", "i2", 6),
    ("U1", "i3", 7), ("U1", "i4", 8), ("U1", "i1", 9), ("U1", "i2", 11), ("U1", "i3", 12), ("U1", "i4", 13),
    ("U2", "i2", 20), ("U2", "i4", 30),
    ("U3", "i4", 15), ("U3", "i3", 16), ("U3", "i2", 20), ("U3", "i1", 40),
    ("U4", "i1", 50), ("U4", "i2", 51), ("U4", "i5", 52),
    ("U5", "i5", 53), ("U5", "i4", 54),
    ("U6", "i5", 55), ("U6", "i1", 56), ("U6", "i2", 57),
    ("U1", "i2", -200),  # before the window
    ("U2", "i1", 400),  # after the window end
    ("U3", "ghost", 60),  # item not in meta
    ("U3", "x_short", 61),  # item whose title was filtered
    ("U1", "i6", -100), ("U2", "i6", -101), ("U3", "i6", -102),  # before the window
    ("U3", "i4", 364),  # 2017-12-31: the end day is inclusive
]

# (user_id, history, target, timestamp) in split order, worked out by hand
EXPECTED = [
    ("A1", [1], 2, T(2)),
    ("A1", [1, 2], 0, T(3)),
    ("A1", [1, 2, 0], 3, T(4)),
    ("A1", [1, 2, 0, 3], 1, T(5)),
    ("A1", [1, 2, 0, 3, 1], 2, T(6)),
    ("A1", [1, 2, 0, 3, 1, 2], 0, T(7)),
    ("A1", [1, 2, 0, 3, 1, 2, 0], 3, T(8)),
    ("A1", [1, 2, 0, 3, 1, 2, 0, 3], 1, T(9)),
    ("A0", [0], 1, T(10)),
    ("A1", [1, 2, 0, 3, 1, 2, 0, 3, 1], 2, T(11)),
    ("A1", [1, 2, 0, 3, 1, 2, 0, 3, 1, 2], 0, T(12)),
    ("A1", [2, 0, 3, 1, 2, 0, 3, 1, 2, 0], 3, T(13)),  # 12th review: history cut to the last 10
    ("A2", [3], 0, T(16)),
    ("A0", [0, 1], 2, T(20)),  # tie at day 20: user A0 before A2
    ("A2", [3, 0], 2, T(20)),
    ("A0", [0, 1, 2], 3, T(30)),
    ("A2", [3, 0, 2], 1, T(40)),
    ("A2", [3, 0, 2, 1], 3, T(364)),
]


def write_raw(folder: Path, gz: bool = False, category: str = "Tools") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    reviews = "".join(
        json.dumps({"overall": 5.0, "reviewerID": u, "asin": a, "unixReviewTime": T(d), "reviewText": "ok"}) + "\n" for u, a, d in REVIEWS
    )
    meta = "".join(json.dumps(m) + "\n" for m in META)
    for name, text in ((f"{category}_5.json", reviews), (f"meta_{category}.json", meta)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (folder / name).write_text(text, encoding="utf-8")
    return folder


def config(folder: Path, *extra: str):
    return load_config(None, ["data.source=amazon2018", f"data.input={folder}", "data.k_core=3", "data.window_start='2017-01-01'",
                              "data.window_end='2017-12-31'", "data.min_items=0", *extra])


def rows(out: Path, split: str) -> list[tuple]:
    t = pq.read_table(out / f"{split}.parquet").to_pydict()
    return list(zip(t["user_id"], t["history_item_ids"], t["item_id"], t["timestamp"]))


@pytest.mark.parametrize("gz, block_bytes", [(False, None), (True, 512)])
def test_hand_computed_sample(tmp_path, monkeypatch, gz, block_bytes):
    if block_bytes:  # many small blocks: row offsets must carry across batches
        monkeypatch.setattr("tsrec.data.jsonl.BLOCK_BYTES", block_bytes)
    raw = write_raw(tmp_path / "raw", gz=gz)
    stats = prepare_data(config(raw), tmp_path / "out")
    out = tmp_path / "out"

    assert rows(out, "train") == EXPECTED[:14]  # int(18 * 0.8) = 14
    assert rows(out, "valid") == EXPECTED[14:16]  # int(18 * 0.9) = 16
    assert rows(out, "test") == EXPECTED[16:]

    items = pq.read_table(out / "items.parquet").to_pydict()
    assert items["item_id"] == [0, 1, 2, 3]
    assert items["asin"] == ["i3", "i1", "i2", "i4"]
    assert items["title"] == ["Gamma Tape", "Alpha Staples v2", "Beta & Glue", 'Delta "Pro" Meter']
    assert items["description"] == ["", "Heavy-duty staples For roofing & felt.", "", "Reads volts."]
    assert items["description_raw"][1] == "['Heavy-duty staples', 'For roofing & felt.']"
    assert items["brand"] == ["G", "Stanley", "B", "D"]

    assert stats["items"] == 4 and stats["users"] == 3 and stats["rows"] == {"train": 14, "valid": 2, "test": 2}
    assert stats["kcore_passes"] == 4 and stats["interactions"] == 21
    assert stats["window_start_used"] == "2017-01-01"
    assert stats["skipped"] == {
        "meta_no_title": 2,
        "meta_title_span_id": 1,
        "meta_title_too_short": 1,
        "meta_title_too_long": 1,
        "meta_duplicate_asin": 1,
        "reviews_untitled_item": 2,
        "reviews_after_window": 1,
        "reviews_before_window": 4,
        "reviews_kcore": 8,
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"] == json.loads(json.dumps(stats)) and manifest["config"]["data"]["k_core"] == 3


def test_window_moves_back_a_year_until_min_items(tmp_path):
    raw = write_raw(tmp_path / "raw")
    # 4 items survive in 2017; moving the start to 2016-01-01 brings in i6 (3 reviews in 2016) -> 5 items
    stats = prepare_data(config(raw, "data.min_items=5"), tmp_path / "a")
    assert stats["window_start_used"] == "2016-01-01" and stats["items"] == 5 and stats["min_items_reached"]
    # 6 items are never reached: the start stops once it precedes every review (2016-06-15)
    stats = prepare_data(config(raw, "data.min_items=6"), tmp_path / "b")
    assert stats["window_start_used"] == "2016-01-01" and stats["items"] == 5 and not stats["min_items_reached"]


def test_five_core_and_deterministic(tmp_path):
    # k_core=5: pass 1 drops U2, U4-U6 and i5; pass 2 drops i1-i3 (4 reviews left each); pass 3 drops
    # U1 and U3 (3 and 2 reviews of i4 left): nothing survives, which is an error naming the filter
    raw = write_raw(tmp_path / "raw")
    from tsrec.artifacts import InputError

    with pytest.raises(InputError, match="5-core"):
        prepare_data(config(raw, "data.k_core=5"), tmp_path / "x")
    prepare_data(config(raw), tmp_path / "a")
    prepare_data(config(raw), tmp_path / "b")
    for name in ("items", "train", "valid", "test"):
        assert pq.read_table(tmp_path / "a" / f"{name}.parquet").equals(pq.read_table(tmp_path / "b" / f"{name}.parquet"))


# --------------------------------------------------------------------------------------------------
# Parity with an obvious pure-Python reference of METHOD.md 1.1 on a random sample with many ties
# --------------------------------------------------------------------------------------------------


def reference_pipeline(meta: list[dict], reviews: list[dict], k: int, start_ts: int, end_ts: int, max_history: int = 10):
    """Dicts, Counters and stable sorts, one rule at a time: slow and obviously right."""
    from collections import Counter

    titles = {}
    for m in meta:
        t = m.get("title")
        if t is None or "<span id" in t:
            continue
        t = t.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
        if len(t) > 1 and len(t.split(" ")) <= 20:
            titles[m["asin"]] = t
    kept = [r for r in reviews if r["asin"] in titles and start_ts <= r["unixReviewTime"] <= end_ts]
    while True:
        users, items = Counter(r["reviewerID"] for r in kept), Counter(r["asin"] for r in kept)
        survivors = [r for r in kept if users[r["reviewerID"]] >= k and items[r["asin"]] >= k]
        if len(survivors) == len(kept):
            break
        kept = survivors
    by_user: dict[str, list[dict]] = {}
    for r in kept:  # dict order = first appearance in the file
        by_user.setdefault(r["reviewerID"], []).append(r)
    item_ids: dict[str, int] = {}
    samples = []
    for u, (user, rs) in enumerate(by_user.items()):
        rs = sorted(rs, key=lambda r: r["unixReviewTime"])  # stable: ties keep file order
        seq = [item_ids.setdefault(r["asin"], len(item_ids)) for r in rs]
        for i in range(1, len(seq)):
            samples.append((f"A{u}", seq[max(0, i - max_history) : i], seq[i], rs[i]["unixReviewTime"]))
    samples.sort(key=lambda s: s[3])
    n = len(samples)
    a, b = int(n * 0.8), int(n * 0.9)
    return [titles[a_] for a_ in item_ids], {"train": samples[:a], "valid": samples[a:b], "test": samples[b:]}


def test_matches_pure_python_reference(tmp_path):
    import random

    rng = random.Random(0)
    meta = [{"asin": f"p{i}", "title": rng.choice([f"Product {i} &amp; co", f'"Thing {i}"', "X", None, f"Gadget {i}"])} for i in range(80)]
    meta = [{k: v for k, v in m.items() if v is not None} for m in meta]
    reviews = []
    for u in range(200):
        for _ in range(rng.randint(2, 16)):
            # few distinct days -> many same-time ties inside a user and across users
            day = rng.randint(-60, 400)
            reviews.append({"reviewerID": f"R{rng.randint(0, 10**6)}" if rng.random() < 0.02 else f"U{u}", "asin": f"p{rng.randint(0, 79)}", "unixReviewTime": T(day)})
    rng.shuffle(reviews)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "R_5.json").write_text("".join(json.dumps(r) + "\n" for r in reviews))
    (raw / "meta_R.json").write_text("".join(json.dumps(m) + "\n" for m in meta))
    cfg = load_config(None, ["data.source=amazon2018", f"data.input={raw}", "data.k_core=4", "data.min_items=0",
                             "data.window_start='2017-01-01'", "data.window_end='2017-12-31'"])
    stats = prepare_data(cfg, tmp_path / "out")
    titles, splits = reference_pipeline(meta, reviews, 4, T(0), T(364))
    assert stats["items"] == len(titles) > 20
    assert pq.read_table(tmp_path / "out" / "items.parquet").column("title").to_pylist() == titles
    for split, expected in splits.items():
        assert rows(tmp_path / "out", split) == expected
