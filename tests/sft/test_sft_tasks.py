"""SFT task mixture: counts on Industrial (METHOD.md 1.6), shares, loss weights, validation set."""

from __future__ import annotations

import pytest

from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, require_shared
from tsrec.config import load_config
from tsrec.sft.tasks import build_mixture, resample, tokenize_samples


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


# --- Templates and label mask, pinned by an expectation written independently of tsrec.prompts ---
# Literal strings of METHOD.md 1.6 (JSON-escaped there; note the spaces before the newlines).
PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request. \n\n### Instruction:\n")
NEXT_SID = ("Can you predict the next possible item that the user may expect?\n\n",
            "### User Input: \nThe user has interacted with items {H} in chronological order. Can you predict the next "
            "possible item that the user may expect?\n\n### Response:\n")
TITLE_TO_SID = ("Answer the question about item identification.\n\n",
                "### User Input: \nWhich item has the title: {title}?\n\n### Response:\n")
SID_TO_TITLE = ("Answer the question about item identification.\n\n",
                '### User Input: \nWhat is the title of item "{sid}"?\n\n### Response:\n')
HISTORY_TO_TITLE = ("Can you recommend the next item for the user based on their interaction history?\n\n",
                    "### User Input: \nThe user has sequentially interacted with items {H}. Can you recommend the next "
                    "item for him? Tell me the title of the item\n\n### Response:\n")
TOKEN_TO_DESC = ("Answer the question about item Semantic ID token identification.\n",
                 "### User Input: \nWhat is the typical scope and shared features of items that contain the token: "
                 "{token}?\n\n### Response:\n")
DESC_TO_TOKEN = ("Answer the question about item Semantic ID token identification.\n",
                 "### User Input: \nWhat token do the items that have the following scope and shared characteristics "
                 'contain: "{description}"?\n\n### Response:\n')


def _expected_segments(tiny):
    """(A, B, C) of every SFT sample, from the raw files (pyarrow + json), not from the tsrec readers."""
    import json

    import pyarrow.parquet as pq

    sid = {int(k): "".join(v) for k, v in json.loads((tiny["sids"] / "index.json").read_text()).items()}
    items = pq.read_table(tiny["data"] / "items.parquet").to_pydict()
    title = dict(zip(items["item_id"], items["title"]))
    train = pq.read_table(tiny["data"] / "train.parquet").to_pydict()
    out = []

    def add(template, target, **fields):
        out.append((PREAMBLE + template[0], template[1].format(**fields), target + "\n"))

    for hist, target in zip(train["history_item_ids"], train["item_id"]):
        h = ", ".join(sid[i] for i in hist)
        add(NEXT_SID, sid[target], H=h)
        add(HISTORY_TO_TITLE, title[target], H=h)  # tiny catalogue: one item per SID
    for i in sorted(title):
        add(TITLE_TO_SID, sid[i], title=title[i])
        add(SID_TO_TITLE, title[i], sid=sid[i])
    for rec in json.loads(tiny["semantics"].read_text()):
        add(TOKEN_TO_DESC, rec["description"], token=rec["token"])
        add(DESC_TO_TOKEN, rec["token"], description=rec["description"])
    valid = pq.read_table(tiny["data"] / "valid.parquet").to_pydict()
    val = [(PREAMBLE + NEXT_SID[0], NEXT_SID[1].format(H=", ".join(sid[i] for i in hist)), sid[t] + "\n")
           for hist, t in zip(valid["history_item_ids"], valid["item_id"])]
    return out, val


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sft_synth import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tasks_tiny"), n_train=12, n_valid=4)


def test_templates_and_label_mask_match_method_1_6(tiny):
    """Every sample the real builder makes has METHOD.md's exact strings, and its labels are -100 on
    every prompt token and the response ids (C + EOS) elsewhere, segments tokenised separately."""
    from collections import Counter

    from transformers import AutoTokenizer

    cfg = load_config(None, ["sft.use_ts_align=true"])
    mix = build_mixture(cfg, tiny["data"], tiny["sids"], tiny["semantics"])
    train_exp, valid_exp = _expected_segments(tiny)
    got = Counter((s.instruction, s.user_input, s.completion) for s in mix.train)
    assert got == Counter(train_exp)
    assert [(s.instruction, s.user_input, s.completion) for s in mix.valid] == valid_exp

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    assert tok.bos_token_id is None  # so the expected prompt has no BOS

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    for samples in (mix.train, mix.valid):
        for p, t in zip(samples, tokenize_samples(tok, samples, cfg.sft.cutoff_len, cfg.sft)):
            prompt = ids(p.instruction) + ids(p.user_input)
            response = ids(p.completion) + [tok.eos_token_id]
            assert t.input_ids == prompt + response
            assert t.labels == [-100] * len(prompt) + response, (p.task, p.target)


def test_negative_share_is_a_named_config_error(tiny):
    from tsrec.config import ConfigError

    cfg = load_config(None, ["sft.tasks.item_sid.share=-0.5"])
    with pytest.raises(ConfigError, match=r"sft\.tasks\.item_sid\.share=-0\.5: the share multiplies"):
        build_mixture(cfg, tiny["data"], tiny["sids"], tiny["semantics"])
    # 2.5 = every sample twice plus a seeded half (a multiplier, not a fraction of the mixture).
    mix = build_mixture(load_config(None, ["sft.tasks.item_sid.share=2.5"]), tiny["data"], tiny["sids"], tiny["semantics"])
    assert mix.counts["item_sid"] == round(2.5 * mix.natural_counts["item_sid"])
