"""Teacher answers: find the JSON object and validate it (METHOD.md 1.4 contract). Pure functions.

Errors (:class:`AnswerError`, the answer is unusable): no complete JSON object (truncated or missing),
a missing key, an empty description, keywords not a list of strings or empty after cleaning, a SID
token string in the text. Warnings (the record is kept and the warning recorded): description words or
keyword count outside the contract, over-long keyphrases, dropped duplicate keywords, text around the
JSON object. Key case is normalised (``"Keywords"`` is the ``keywords`` key).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tsrec.semantics.records import record_warnings
from tsrec.sid.index import TOKEN_RE


class AnswerError(ValueError):
    """A teacher answer that cannot be used; the message is the reason recorded with the failure."""


def extract_json_object(text: str) -> tuple[dict[str, Any], bool]:
    """The first JSON object in ``text`` (prose and code fences around it are allowed).

    Returns ``(object, has_surrounding_text)``. Prefers an object with a ``description`` or
    ``keywords`` key when several parse.

    Raises:
        AnswerError: no ``{`` at all, or no position where a complete JSON object parses (truncated).
    """
    decoder = json.JSONDecoder()
    found: list[tuple[dict[str, Any], int, int]] = []
    for m in re.finditer(r"\{", text):
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append((obj, m.start(), end))
            if "description" in obj or "keywords" in obj:
                break
    if not found:
        if "{" not in text:
            raise AnswerError("no JSON object in the answer")
        raise AnswerError("truncated or malformed JSON object")
    obj, start, end = next((f for f in found if "description" in f[0] or "keywords" in f[0]), found[0])
    outside = (text[:start] + text[end:]).replace("```json", "").replace("```", "").strip()
    return obj, bool(outside)


def parse_answer(text: str) -> tuple[str, list[str], list[str]]:
    """Validate one teacher answer.

    Returns:
        ``(description, keywords, warnings)``: whitespace-collapsed description, cleaned keywords
        (stripped, empty and case-insensitive duplicates dropped), contract warnings.

    Raises:
        AnswerError: the answer is unusable (see the module docstring); the message is the reason.
    """
    obj, surrounded = extract_json_object(text)
    # Key case is not content: accept "Keywords" / " description " as the keys they spell.
    obj = {str(k).strip().lower(): v for k, v in obj.items()}
    missing = [k for k in ("description", "keywords") if k not in obj]
    if missing:
        raise AnswerError(f"missing key(s) {', '.join(missing)}")
    desc = obj["description"]
    if not isinstance(desc, str) or not desc.strip():
        raise AnswerError("description is empty or not a string")
    desc = " ".join(desc.split())
    kws_in = obj["keywords"]
    if not isinstance(kws_in, list) or not all(isinstance(k, str) for k in kws_in):
        raise AnswerError("keywords is not a list of strings")
    keywords: list[str] = []
    seen: set[str] = set()
    for k in kws_in:
        k = " ".join(k.split())
        if k and k.lower() not in seen:
            seen.add(k.lower())
            keywords.append(k)
    if not keywords:
        raise AnswerError("empty keyword list")
    if TOKEN_RE.search(desc) or any(TOKEN_RE.search(k) for k in keywords):
        raise AnswerError("SID token string in the answer")
    warnings = record_warnings(desc, keywords)
    if len(keywords) < len(kws_in):
        warnings.append(f"{len(kws_in) - len(keywords)} empty or duplicate keywords dropped")
    if surrounded:
        warnings.append("text around the JSON object")
    return desc, keywords, warnings
