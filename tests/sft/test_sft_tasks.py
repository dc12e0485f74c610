"""SFT task mixture: counts on Industrial (METHOD.md 1.6), shares, loss weights, validation set."""

from __future__ import annotations

import pytest

from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, require_shared
from tsrec.config import load_config
from tsrec.sft.tasks import build_mixture, resample


@pytest.fixture(scope="module")
def industrial(tmp_path_factory):
    from tsrec.data.prepare import prepare_data

    require_shared(INDUSTRIAL)
    require_shared(INDUSTRIAL_TEACHER)
    out = tmp_path_factory.mktemp("industrial_data")
    cfg = load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"])
    prepare_data(cfg, out)
    return out


def test_industrial_mixture_counts(industrial):
    cfg = load_config(None, ["sft.max_eval_samples=0"])
    mix = build_mixture(cfg, industrial, INDUSTRIAL / "index", INDUSTRIAL_TEACHER)
    assert mix.natural_counts == {"next_sid": 36259, "item_sid": 7316, "history_title": 36259, "ts_align": 1120}
    assert mix.counts == mix.natural_counts and len(mix.train) == 80954
    by_template = {}
    for s in mix.train:
        by_template[s.task] = by_template.get(s.task, 0) + 1
    assert by_template["title_to_sid"] == 3646 and by_template["sid_to_title"] == 3670
    assert len(mix.valid) == 4532 and all(s.task == "next_sid" for s in mix.valid)
    # First Industrial train row (METHOD.md 1.6): history [117] -> item 118.
    first = [s for s in mix.train if s.task == "next_sid" and "<a_165><b_107><c_44> in" in s.user_input
             and s.target == "<a_104><b_118><c_176>"]
    assert first
    # Shuffled once with the seed: deterministic, not in task order.
    again = build_mixture(cfg, industrial, INDUSTRIAL / "index", INDUSTRIAL_TEACHER)
    assert [s.user_input for s in again.train[:50]] == [s.user_input for s in mix.train[:50]]
    assert len({s.task for s in mix.train[:100]}) > 2


def test_shares_and_ts_align_switch(industrial):
    cfg = load_config(None, ["sft.tasks.item_sid.share=0.5", "sft.tasks.ts_align.share=2.5", "sft.use_ts_align=true",
                             "sft.max_eval_samples=100"])
    mix = build_mixture(cfg, industrial, INDUSTRIAL / "index", INDUSTRIAL_TEACHER)
    assert mix.counts["item_sid"] == 3658 and mix.counts["ts_align"] == 2800 and len(mix.valid) == 100
    off = build_mixture(load_config(None, ["sft.use_ts_align=false"]), industrial, INDUSTRIAL / "index", None)
    assert off.counts["ts_align"] == 0


def test_resample_is_deterministic():
    xs = list(range(10))
    assert resample(xs, 1.0, 0) == xs
    assert resample(xs, 0.3, 1) == resample(xs, 0.3, 1) and len(resample(xs, 0.3, 1)) == 3
    two = resample(xs, 2.0, 0)
    assert sorted(two) == sorted(xs * 2)
