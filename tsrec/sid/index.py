"""SID strings, tokens and the MiniOneRec ``index.json`` format (METHOD.md 1.3).

A SID is a tuple of level tokens, written ``<a_12><b_3><c_200>`` with no separator. Level ``l``
(0-based) uses the prefix ``LEVEL_PREFIXES[l]``: ``a, b, c`` and ``d`` for the collision level.

``index.json``: ``{"<item_id>": ["<a_12>", "<b_3>", "<c_200>"], ...}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tsrec.artifacts import InputError, read_json

LEVEL_PREFIXES = "abcde"
TOKEN_RE = re.compile(r"<([a-e])_(\d+)>")


def token(level: int, code: int) -> str:
    """``token(0, 12) == "<a_12>"``."""
    return f"<{LEVEL_PREFIXES[level]}_{int(code)}>"


def token_level(tok: str) -> int:
    """0-based level of a token string (``"<b_3>"`` -> 1)."""
    m = TOKEN_RE.fullmatch(tok)
    if not m:
        raise ValueError(f"not a SID token: {tok!r}")
    return LEVEL_PREFIXES.index(m.group(1))


def sid_string(tokens: Sequence[str]) -> str:
    return "".join(tokens)


def split_sid(sid: str) -> list[str]:
    """``"<a_1><b_2><c_3>"`` -> ``["<a_1>", "<b_2>", "<c_3>"]``; raises on anything else."""
    toks = TOKEN_RE.findall(sid)
    out = [f"<{p}_{n}>" for p, n in toks]
    if "".join(out) != sid or not out:
        raise ValueError(f"not a SID string: {sid!r}")
    return out


@dataclass
class SidIndex:
    """item id -> SID tokens. ``items`` is ordered by item id."""

    items: dict[int, list[str]]

    @property
    def num_levels(self) -> int:
        return max(len(t) for t in self.items.values())

    def sid(self, item_id: int) -> str:
        return sid_string(self.items[item_id])

    def sids(self) -> dict[int, str]:
        return {i: sid_string(t) for i, t in self.items.items()}

    def all_tokens(self) -> list[str]:
        """The string-sorted set of every token in the index: the vocabulary extension (METHOD.md 1.3)."""
        return sorted({t for toks in self.items.values() for t in toks})

    def tokens_by_level(self) -> list[list[str]]:
        by_level: list[set[str]] = [set() for _ in range(self.num_levels)]
        for toks in self.items.values():
            for lvl, t in enumerate(toks):
                by_level[lvl].add(t)
        return [sorted(s, key=lambda t: int(TOKEN_RE.fullmatch(t).group(2))) for s in by_level]

    def to_json_obj(self) -> dict[str, list[str]]:
        return {str(i): list(t) for i, t in sorted(self.items.items())}

    @classmethod
    def from_codes(cls, item_ids: Iterable[int], codes: Iterable[Sequence[int]]) -> SidIndex:
        return cls({int(i): [token(lvl, c) for lvl, c in enumerate(row)] for i, row in zip(item_ids, codes)})


def read_index(path: str | Path) -> SidIndex:
    """Read a MiniOneRec ``index.json``; errors name the file, item and field."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "index.json"] + sorted(path.glob("*.index.json")) + sorted(path.glob("index/*.index.json"))
        found = [c for c in candidates if c.exists()]
        if not found:
            raise InputError(path, "no index.json or *.index.json in this folder")
        path = found[0]
    raw = read_json(path)
    if not isinstance(raw, Mapping) or not raw:
        raise InputError(path, "expected a non-empty JSON object item_id -> [tokens]")
    items: dict[int, list[str]] = {}
    for key, toks in raw.items():
        try:
            item_id = int(key)
        except ValueError:
            raise InputError(path, f"item id {key!r} is not an integer", field="item_id") from None
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) and TOKEN_RE.fullmatch(t) for t in toks):
            raise InputError(path, f"item {key}: expected a list of SID tokens like '<a_1>', got {toks!r}", field="sid")
        for lvl, t in enumerate(toks):
            if token_level(t) != lvl:
                raise InputError(path, f"item {key}: token {t} at level {lvl}", field="sid")
        items[item_id] = list(toks)
    return SidIndex(dict(sorted(items.items())))


def sid_stats(codes: np.ndarray, codebook_size: int, requested_codebook_size: int, levels: int) -> dict[str, Any]:
    """Per-level token use of final SID codes (N, L or L + 1).

    ``codebook_utilisation_per_level`` covers the ``levels`` k-means levels (distinct codes / C); the
    ``<d_r>`` position of ``extra_level`` SIDs has no codebook and appears only in the distinct counts.
    """
    distinct = [int(len(np.unique(codes[:, lvl]))) for lvl in range(codes.shape[1])]
    return {
        "items": int(len(codes)),
        "levels": int(levels),
        "sid_length": int(codes.shape[1]),
        "codebook_size": int(codebook_size),
        "codebook_size_requested": int(requested_codebook_size),
        "distinct_tokens_per_level": distinct,
        "codebook_utilisation_per_level": [round(d / codebook_size, 6) for d in distinct[:levels]],
    }


def sids_table(item_ids: np.ndarray, codes: np.ndarray) -> pa.Table:
    """The ``sids.parquet`` table: item id, SID string, then each level's code and token."""
    toks = [[token(lvl, c) for lvl, c in enumerate(row)] for row in codes.tolist()]
    columns: dict[str, Any] = {
        "item_id": pa.array(item_ids, pa.int64()),
        "sid": pa.array(["".join(t) for t in toks], pa.string()),
    }
    for lvl in range(codes.shape[1]):
        columns[f"code_{lvl}"] = pa.array(codes[:, lvl], pa.int64())
    for lvl in range(codes.shape[1]):
        columns[f"token_{lvl}"] = pa.array([t[lvl] for t in toks], pa.string())
    return pa.table(columns)
