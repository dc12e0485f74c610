"""Fixtures for decoding tests: one tiny SID model holding the Industrial tokens plus ``<d_0..2>``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tsrec.sid.index import SidIndex

# Same location as tests/conftest.py's INDUSTRIAL (conftest modules are not importable by name).
INDUSTRIAL_INDEX = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon" / "Industrial_and_Scientific" / "index"
    / "Industrial_and_Scientific.index.json"
)
EXTRA_TOKENS = ["<d_0>", "<d_1>", "<d_2>"]


@pytest.fixture(scope="session")
def industrial_index():
    from tsrec.sid.index import read_index

    if not INDUSTRIAL_INDEX.exists():
        pytest.skip(f"shared data not found: {INDUSTRIAL_INDEX}")
    return read_index(INDUSTRIAL_INDEX)


@pytest.fixture(scope="session")
def sid_model_dir(tmp_path_factory, industrial_index):
    """A tiny Qwen2 + BPE tokenizer folder with every Industrial SID token and ``<d_0..2>``."""
    from tsrec.tiny import save_tiny_sid_model

    return save_tiny_sid_model(
        tmp_path_factory.mktemp("decode_model"),
        industrial_index.all_tokens() + EXTRA_TOKENS,
        texts=["heavy duty staples glue tape"],
        seed=3,
    )


@pytest.fixture(scope="session")
def sid_model(sid_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sid_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sid_model_dir).eval()
    return model, tok


def small_catalogue(industrial_index, levels: int = 3):
    """12 SIDs over Industrial tokens: 3 a-codes, 1-3 b-codes each, 1-2 c-codes each (+ <d_r>), one collision."""
    a, b, c = (toks[:4] for toks in industrial_index.tokens_by_level())
    sids = [
        (a[0], b[0], c[0]), (a[0], b[0], c[1]), (a[0], b[1], c[0]), (a[0], b[2], c[3]),
        (a[1], b[0], c[2]), (a[1], b[3], c[0]), (a[1], b[3], c[1]),
        (a[2], b[1], c[1]), (a[2], b[1], c[2]), (a[2], b[2], c[0]), (a[2], b[2], c[3]), (a[2], b[3], c[3]),
    ]
    items = {i: list(s) for i, s in enumerate(sids)}
    items[len(sids)] = list(sids[4])  # a collision: two items share one SID
    if levels == 4:
        items = {i: [*t, f"<d_{i % 3}>"] for i, t in items.items()}
    return SidIndex(items)


@pytest.fixture(scope="session")
def make_catalogue(industrial_index):
    """``make_catalogue(levels=3)``: the small exhaustive-test catalogue (3 or 4 levels)."""
    return lambda levels=3: small_catalogue(industrial_index, levels)
