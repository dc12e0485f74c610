"""Teacher records in the authors' format (METHOD.md 1.4, 2.3): read, validate, write.

``description_keywords.json`` is a JSON array with one object per SID token::

    [{"description": "This product family ...", "keywords": ["switches", ...], "token": "<a_236>"}, ...]

Key order ``description, keywords, token`` as in the Industrial file. SA-Init (``tsrec model init``)
and TS-Align (SFT) read it through :func:`read_teacher_file`; ``tsrec semantics extract`` writes it
with :func:`write_teacher_file`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tsrec.artifacts import InputError, atomic_write_json, read_json
from tsrec.sid.index import TOKEN_RE

# The contract for tsrec-generated files (METHOD.md 1.4): outside these ranges a record is kept but
# carries a warning; the authors' Industrial file has 55-118 words and 18-26 keywords.
DESCRIPTION_WORDS = (55, 120)
KEYWORD_COUNT = (15, 26)
KEYWORD_MAX_WORDS = 6


def read_teacher_file(path: str | Path) -> list[dict[str, Any]]:
    """Read a teacher file; every record must have a SID ``token``, a non-empty ``description`` and keywords.

    Returns records ``{"description", "keywords", "token"}`` in file order.

    Raises:
        InputError: not a JSON array, a record without a field or of the wrong type, a duplicate token;
            ``row`` is the 1-based record number.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "teacher file not found")
    raw = read_json(path)
    if not isinstance(raw, list):
        raise InputError(path, f"expected a JSON array of records, got {type(raw).__name__}")
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for n, rec in enumerate(raw, start=1):
        if not isinstance(rec, dict):
            raise InputError(path, f"record {n} is a {type(rec).__name__}, expected an object", row=n)
        tok = rec.get("token")
        if not isinstance(tok, str) or not TOKEN_RE.fullmatch(tok):
            raise InputError(path, f"record {n}: token {tok!r} is not a SID token like '<a_12>'", row=n, field="token")
        if tok in seen:
            raise InputError(path, f"record {n}: duplicate token {tok}", row=n, field="token")
        seen.add(tok)
        desc = rec.get("description")
        if not isinstance(desc, str) or not desc.strip():
            raise InputError(path, f"record {n} ({tok}): description must be a non-empty string", row=n, field="description")
        kws = rec.get("keywords")
        if not isinstance(kws, list) or not kws or not all(isinstance(k, str) and k.strip() for k in kws):
            raise InputError(path, f"record {n} ({tok}): keywords must be a non-empty list of non-empty strings",
                             row=n, field="keywords")
        records.append({"description": desc, "keywords": list(kws), "token": tok})
    return records


def write_teacher_file(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write records in the authors' format and key order (atomically)."""
    out = [{"description": r["description"], "keywords": list(r["keywords"]), "token": r["token"]} for r in records]
    atomic_write_json(path, out, indent=2)


def record_warnings(description: str, keywords: Sequence[str]) -> list[str]:
    """Contract checks that keep the record but are reported (METHOD.md 1.4 ranges)."""
    warnings = []
    words = len(description.split())
    if not DESCRIPTION_WORDS[0] <= words <= DESCRIPTION_WORDS[1]:
        warnings.append(f"description has {words} words (contract {DESCRIPTION_WORDS[0]}-{DESCRIPTION_WORDS[1]})")
    if not KEYWORD_COUNT[0] <= len(keywords) <= KEYWORD_COUNT[1]:
        warnings.append(f"{len(keywords)} keywords (contract {KEYWORD_COUNT[0]}-{KEYWORD_COUNT[1]})")
    long = [k for k in keywords if len(k.split()) > KEYWORD_MAX_WORDS]
    if long:
        warnings.append(f"{len(long)} keywords longer than {KEYWORD_MAX_WORDS} words")
    return warnings


def validate_record_set(records: Sequence[dict[str, Any]], tokens: Sequence[str]) -> dict[str, Any]:
    """Compare a record set with the index token set (METHOD.md 1.4 validation).

    Returns ``{"missing": [...], "extra": [...], "duplicate_descriptions": [[tok, ...], ...],
    "warnings": {token: [...]}}``; lists are in ``tokens`` / file order.
    """
    have = {r["token"] for r in records}
    want = set(tokens)
    by_desc: dict[str, list[str]] = {}
    for r in records:
        by_desc.setdefault(r["description"].strip(), []).append(r["token"])
    warnings = {r["token"]: w for r in records if (w := record_warnings(r["description"], r["keywords"]))}
    return {
        "missing": [t for t in tokens if t not in have],
        "extra": [r["token"] for r in records if r["token"] not in want],
        "duplicate_descriptions": [toks for toks in by_desc.values() if len(toks) > 1],
        "warnings": warnings,
    }
