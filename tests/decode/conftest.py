"""Fixtures for decoding tests.

Decoding needs only SID token names, so the default catalogue is a **generated** one
(:func:`generated_index`: deterministic, 3 levels, 600 distinct SIDs + one collision, Industrial-style
token names ``<a_N><b_N><c_N>``): these tests run on any machine. The Industrial index under
``../shared/data`` is used only by the tests that are about that catalogue (``industrial_*`` fixtures,
which skip without the shared data; CI always has it and ``.ci/run`` fails without it).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tsrec.sid.index import SidIndex

# Same location as tests/conftest.py's INDUSTRIAL (conftest modules are not importable by name).
INDUSTRIAL_INDEX = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon" / "Industrial_and_Scientific" / "index"
    / "Industrial_and_Scientific.index.json"
)
EXTRA_TOKENS = ["<d_0>", "<d_1>", "<d_2>"]
GENERATED_SIDS = 600


def generated_index(n_sids: int = GENERATED_SIDS, codebooks: tuple[int, int, int] = (24, 64, 256), seed: int = 0) -> SidIndex:
    """``n_sids`` distinct random 3-level SIDs (+ one item sharing SID 7: a collision), fixed by ``seed``.

    Narrow first levels give a real prefix tree (many SIDs per ``<a>`` and per ``<a><b>``).
    """
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    codes: list[tuple[int, int, int]] = []
    while len(codes) < n_sids:
        c = tuple(rng.randrange(k) for k in codebooks)
        if c not in seen:
            seen.add(c)
            codes.append(c)
    codes.append(codes[7])
    return SidIndex.from_codes(range(len(codes)), codes)


def _save_model(root: Path, index: SidIndex) -> Path:
    from tsrec.tiny import save_tiny_sid_model

    return save_tiny_sid_model(root, index.all_tokens() + EXTRA_TOKENS, texts=["heavy duty staples glue tape"], seed=3)


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return model, tok


@pytest.fixture(scope="session")
def sid_index() -> SidIndex:
    """The generated catalogue (always available)."""
    return generated_index()


@pytest.fixture(scope="session")
def sid_model_dir(tmp_path_factory, sid_index):
    """A tiny Qwen2 + BPE tokenizer folder with every generated SID token and ``<d_0..2>``."""
    return _save_model(tmp_path_factory.mktemp("decode_model"), sid_index)


@pytest.fixture(scope="session")
def sid_model(sid_model_dir):
    return _load(sid_model_dir)


@pytest.fixture(scope="session")
def industrial_index():
    from tsrec.sid.index import read_index

    if not INDUSTRIAL_INDEX.exists():
        pytest.skip(f"shared data not found: {INDUSTRIAL_INDEX}")
    return read_index(INDUSTRIAL_INDEX)


@pytest.fixture(scope="session")
def industrial_model(tmp_path_factory, industrial_index):
    """The same tiny model family with every Industrial SID token (shared data only)."""
    return _load(_save_model(tmp_path_factory.mktemp("decode_model_industrial"), industrial_index))


def small_catalogue(index: SidIndex, levels: int = 3):
    """12 SIDs over the index's tokens: 3 a-codes, 1-3 b-codes each, 1-2 c-codes each (+ <d_r>), one collision."""
    a, b, c = (toks[:4] for toks in index.tokens_by_level())
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
def make_catalogue(sid_index):
    """``make_catalogue(levels=3)``: the small exhaustive-test catalogue (3 or 4 levels)."""
    return lambda levels=3: small_catalogue(sid_index, levels)
