"""RL prompts (tsrec/rl/data.py): the four tasks, own targets (R8), empty descriptions, counts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared_data import INDUSTRIAL, require_shared
from tsrec import prompts
from tsrec.config import load_config
from tsrec.data.schema import SAMPLES_SCHEMA
from tsrec.rl.data import build_rl_data, processed_description, tokenize_rl

SIDS = {
    0: ["<a_0>", "<b_0>", "<c_0>"],
    1: ["<a_0>", "<b_0>", "<c_0>"],  # collides with item 0 (same title and description too)
    2: ["<a_0>", "<b_1>", "<c_0>"],
    3: ["<a_1>", "<b_0>", "<c_1>"],
    4: ["<a_1>", "<b_1>", "<c_1>"],
    5: ["<a_2>", "<b_0>", "<c_0>"],
}
ITEMS = [  # title, raw description
    ("Glue A", "['Strong glue']"),
    ("Glue A", "['Strong glue']"),
    ("Glue A", "['Other glue']"),  # same title, another SID: its own title sample
    ("Tape", ""),  # no description: dropped from the description task
    ("Drill", "['', 'Cordless drill']"),  # upstream: first element "" (dropped); canonical: "Cordless drill"
    ("Saw", "plain text"),  # not a list literal: the raw string
]
TRAIN = [("u1", [0], 3), ("u2", [0], 4), ("u3", [3, 4], 5), ("u4", [5], 2)]  # rows 0 and 1: same prompt, other targets
VALID = [("u1", [0, 3], 4)]


@pytest.fixture(scope="module")
def hand_split(tmp_path_factory):
    d = tmp_path_factory.mktemp("rl_hand")
    pq.write_table(pa.table({
        "item_id": pa.array(range(len(ITEMS)), pa.int64()),
        "title": [t for t, _ in ITEMS],
        "description": [processed_description(r, "canonical") for _, r in ITEMS],
        "description_raw": [r for _, r in ITEMS],
    }), d / "items.parquet")
    for name, rows in (("train", TRAIN), ("valid", VALID), ("test", VALID)):
        pq.write_table(pa.table({"user_id": [r[0] for r in rows], "history_item_ids": [r[1] for r in rows],
                                 "item_id": [r[2] for r in rows], "timestamp": [-1] * len(rows)}, schema=SAMPLES_SCHEMA),
                       d / f"{name}.parquet")
    (d / "index.json").write_text(json.dumps({str(k): v for k, v in SIDS.items()}))
    return d


def _sid(i):
    return "".join(SIDS[i])


def test_hand_split_counts_and_own_targets(hand_split):
    cfg = load_config(None, ["prompts.mode=upstream", "rl.title_history_rows=0"])
    rl = build_rl_data(cfg, hand_split, hand_split)
    assert rl.counts == {"sid_history": 4, "title": 5, "description": 3, "title_history": 4}
    assert rl.dropped == {"empty_description_items": 2}
    assert len(rl.train) == 16 and not hasattr(rl, "valid")  # valid rows: tsrec.train.ranking

    by_task = {t: [s for s in rl.train if s.task == t] for t in rl.counts}
    # R8: the two rows with history [item 0] give one prompt text, but two samples with their own targets.
    same = [s for s in by_task["sid_history"] if s.prompt.prompt == prompts.next_sid([_sid(0)], mode="upstream", stage="rl").prompt]
    assert sorted(s.target_sid for s in same) == sorted([_sid(3), _sid(4)])
    assert sorted(s.target_item for s in same) == [3, 4]
    # Title "Glue A" names two SIDs: two samples; items 0 and 1 (same title, same SID) give one.
    glue = sorted(s.target_sid for s in by_task["title"] if "Glue A" in s.prompt.prompt)
    assert glue == sorted([_sid(0), _sid(2)])
    descs = sorted(s.prompt.user_input for s in by_task["description"])
    assert not any('described as follows: ""' in d for d in descs)
    assert any('"plain text"' in d for d in descs) and any('"Strong glue"' in d for d in descs)
    # Upstream RL prompts have no preamble (METHOD.md 1.7).
    assert all(s.prompt.prompt.startswith(prompts.INPUT_HEADER) and s.prompt.instruction == "" for s in rl.train)
    th = by_task["title_history"]
    assert any('"Tape", "Drill"' in s.prompt.prompt and s.target_sid == _sid(5) for s in th)


def test_canonical_mode_keeps_list_with_empty_first_element(hand_split):
    cfg = load_config(None, ["rl.title_history_rows=2"])
    rl = build_rl_data(cfg, hand_split, hand_split)
    assert rl.counts == {"sid_history": 4, "title": 5, "description": 4, "title_history": 2}
    assert rl.dropped == {"empty_description_items": 1}
    assert any('"Cordless drill"' in s.prompt.prompt and s.target_sid == _sid(4) for s in rl.train)
    assert all(s.prompt.prompt.startswith(prompts.PREAMBLE) for s in rl.train)
    # title_history rows drawn like pandas sample(2, random_state=0).
    picked = np.random.RandomState(0).choice(4, size=2, replace=False).tolist()
    th = [s for s in rl.train if s.task == "title_history"]
    assert sorted(s.target_item for s in th) == sorted(TRAIN[i][2] for i in picked)
    # Shuffled once with run.seed: deterministic.
    again = build_rl_data(cfg, hand_split, hand_split)
    assert [s.prompt.prompt for s in again.train] == [s.prompt.prompt for s in rl.train]


def test_unknown_task_is_a_named_error(hand_split):
    cfg = load_config(None)
    cfg.rl.tasks = ["sid_history", "bogus"]
    with pytest.raises(ValueError, match="bogus"):
        build_rl_data(cfg, hand_split, hand_split)


def test_processed_description_modes():
    assert processed_description("['a b', 'c']", "upstream") == "a b"
    assert processed_description("[' a ']", "upstream") == " a "  # upstream does not strip
    assert processed_description("['', 'x']", "upstream") == ""
    assert processed_description("['', 'x']", "canonical") == "x"
    assert processed_description("['it's', 'y']", "upstream") == "['it's', 'y']"  # not a literal: raw
    assert processed_description("['it's', 'y']", "canonical") == "it's"  # split on quote-comma-quote
    assert processed_description('["a"]', "upstream") == '["a"]'


def test_tokenize_rl_targets_and_whole_prompt_ids(hand_split):
    from tsrec.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["Glue Tape Drill Saw"])
    tok.add_tokens(sorted({t for v in SIDS.values() for t in v}))
    rl = build_rl_data(load_config(None, ["prompts.mode=upstream"]), hand_split, hand_split)
    out = tokenize_rl(tok, rl.train)
    for s, t in zip(rl.train, out):
        assert tok.convert_ids_to_tokens(t.target_ids) == list(SIDS[s.target_item])
        # One segment in upstream RL: the same ids as tokenising the whole prompt (METHOD.md 1.7).
        assert t.prompt_ids == tok(s.prompt.prompt, add_special_tokens=False)["input_ids"]
    bare = build_tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown to the tokenizer"):
        tokenize_rl(bare, rl.train[:1])


@pytest.fixture(scope="module")
def industrial(tmp_path_factory):
    from tsrec.data.prepare import prepare_data

    require_shared(INDUSTRIAL)
    out = tmp_path_factory.mktemp("industrial_rl_data")
    prepare_data(load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"]), out)
    return out


def test_industrial_counts(industrial):
    """METHOD.md 1.7: 36,259 + 3,646 + 2,870 + 10,000; R8 changes the per-item tasks (see tsrec/rl/data.py)."""
    rl = build_rl_data(load_config(None, ["prompts.mode=upstream"]), industrial, INDUSTRIAL / "index")
    assert rl.counts == {"sid_history": 36259, "title": 3675, "description": 3069, "title_history": 10000}
    assert rl.dropped == {"empty_description_items": 608}
    items = pq.read_table(industrial / "items.parquet").column("description_raw").to_pylist()
    assert len({processed_description(r, "upstream") for r in items}) == 2870  # the public count, "" included
    assert len({s.prompt.prompt for s in rl.train if s.task == "title"}) == 3646  # distinct titles, as upstream
    # R8: every train row is its own sample with its own target, also where one history has several next items.
    rows = pq.read_table(industrial / "train.parquet")
    sids = pq.read_table(industrial / "items.parquet").column("sid").to_pylist()
    own = Counter((", ".join(sids[i] for i in h), sids[t]) for h, t in zip(rows.column("history_item_ids").to_pylist(),
                                                                         rows.column("item_id").to_pylist()))
    got = Counter((s.prompt.prompt.split("items ")[1].split(" in chronological")[0], s.target_sid)
                  for s in rl.train if s.task == "sid_history")
    assert got == own and sum(got.values()) == 36259
    targets_of_history: dict[str, set[str]] = {}
    for h, t in got:
        targets_of_history.setdefault(h, set()).add(t)
    # Histories with several next items: upstream scores all their rows against one target; here each keeps its own.
    assert sum(len(v) > 1 for v in targets_of_history.values()) > 1000
    canon = build_rl_data(load_config(None), industrial, INDUSTRIAL / "index")
    assert canon.counts["description"] == 3444 and canon.dropped == {"empty_description_items": 232}
