"""Teacher answers: find the JSON object and validate it (METHOD.md 1.4 contract). Pure functions.

Errors (:class:`AnswerError`, the answer is unusable): no complete JSON object (truncated or missing),
a missing key, an empty description, keywords not a list of strings or empty after cleaning, a SID
token string in the text, and, when a :class:`Contract` is given (the hf and vllm engines), any breach
of the METHOD.md 1.4 contract: description words or keyword count out of range, duplicate keywords,
stopword-only keyphrases ("of", "the"), one word repeated as a keyphrase ("Laser Laser Laser"), a description
that repeats a phrase (a 3-word run occurring 3 or more times), over-long keyphrases, URLs, runs copied from the
instruction.
Warnings (without a contract) (the record is kept and the warning recorded): description words or
keyword count outside the contract, over-long keyphrases, dropped duplicate keywords, text around the
JSON object. Key case is normalised (``"Keywords"`` is the ``keywords`` key).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tsrec.semantics.records import record_warnings
from tsrec.sid.index import TOKEN_RE

# A keyphrase made only of these words says nothing ("of", "the", "and more").
STOPWORDS = frozenset(
    "a an and are as at be but by for from has have in into is it its more of on or other others etc "
    "that the their them these they this those to with without".split())
URL_RE = re.compile(r"https?://|\bwww\.|\b[\w-]+\.(?:com|net|org|io|co\.uk)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Bumped whenever a rule is added or tightened: a record accepted under an older contract may break this one.
CONTRACT_VERSION = 3


def is_stopword_phrase(keyphrase: str) -> bool:
    """True when ``keyphrase`` has no word outside :data:`STOPWORDS` (case-insensitive: "BE", "of the", "--")."""
    return all(w in STOPWORDS for w in _WORD_RE.findall(keyphrase.lower()))


def is_repeated_word_phrase(keyphrase: str) -> bool:
    """True when at least half the words of ``keyphrase`` (2 or more words) repeat an earlier one: the same word
    (case-insensitive) or one that starts with it or that it starts with (3 letters at least). "Laser Laser",
    "crystal Crystal CRYSTAL", "Crystal Crystal Crystal Crystal Crystal CrystalCl" and "Bosch BOSCHBOS" are;
    "Laser" alone, "laser laser cutter" and "3D 3D printer" are not. (The guided decoder evaded the plain
    one-word rule by appending letters to the last repeat.)"""
    words = _WORD_RE.findall(keyphrase.lower())

    def repeats(w: str, earlier: list[str]) -> bool:
        return any(w == e or (min(len(w), len(e)) >= 3 and (w.startswith(e) or e.startswith(w))) for e in earlier)

    n_repeats = sum(repeats(w, words[:i]) for i, w in enumerate(words))
    return len(words) >= 2 and 2 * n_repeats >= len(words)


def repeated_run(description: str, n: int, max_repeats: int) -> tuple[str, int]:
    """The most frequent run of ``n`` consecutive words (case-insensitive, overlapping runs counted) when it
    occurs more than ``max_repeats`` times, with its count; ``("", 0)`` otherwise or when ``n`` or
    ``max_repeats`` is 0 (off). A description saying the same thing over and over ("... staples and glue.
    ... staples and glue. ... staples and glue.") has such a run; the 560 descriptions of the authors'
    Industrial_and_Scientific teacher file repeat no 3-word run even twice."""
    if n <= 0 or max_repeats <= 0:
        return "", 0
    words = _WORD_RE.findall(description.lower())
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        counts[gram] = counts.get(gram, 0) + 1
    if not counts:
        return "", 0
    gram, count = max(counts.items(), key=lambda kv: kv[1])  # first-seen wins ties: deterministic
    return (" ".join(gram), count) if count > max_repeats else ("", 0)


def keyphrase_problem(keyphrase: str, max_words: int = 0) -> str:
    """Why one keyphrase would break the contract on its own ('' = none): stopword-only, one word repeated,
    a URL, over ``max_words`` words (0 = no limit). The guided decoder asks this before it lets a keyphrase
    close, so decoding and validation apply the same rules."""
    if is_stopword_phrase(keyphrase):
        return "stopword keyphrase"
    if is_repeated_word_phrase(keyphrase):
        return "repeated-word keyphrase"
    if URL_RE.search(keyphrase):
        return "URL in a keyphrase"
    if max_words and len(keyphrase.split()) > max_words:
        return f"keyphrase longer than {max_words} words"
    return ""


@dataclass(frozen=True)
class Contract:
    """The METHOD.md 1.4 quality contract, enforced: a violation makes the answer unusable (``AnswerError``).

    Limits come from ``teacher.*`` (:meth:`from_config`). ``instruction`` is the prompt's instruction text;
    a description holding a run of ``instruction_copy_words`` of its words copies the instruction.
    A description in which a run of ``repeat_run_words`` words occurs more than ``max_run_repeats`` times
    repeats itself (either 0 = off); a keyphrase that is one word repeated is a breach as well.
    """

    min_words: int = 55
    max_words: int = 120
    min_keywords: int = 15
    max_keywords: int = 26
    max_keyword_words: int = 6
    instruction_copy_words: int = 6
    instruction: str = ""
    repeat_run_words: int = 3
    max_run_repeats: int = 2

    @classmethod
    def from_config(cls, tcfg: Any, instruction: str = "") -> "Contract":
        return cls(tcfg.min_description_words, tcfg.max_description_words, tcfg.min_keywords, tcfg.max_keywords,
                   tcfg.max_keyword_words, tcfg.instruction_copy_words, instruction)

    def violations(self, description: str, keywords: Sequence[str], raw_keywords: Sequence[str]) -> list[str]:
        """Every rule the record breaks, as reasons ('' list = it meets the contract)."""
        out = []
        words = len(description.split())
        if not self.min_words <= words <= self.max_words:
            out.append(f"description has {words} words (contract {self.min_words}-{self.max_words})")
        if not self.min_keywords <= len(keywords) <= self.max_keywords:
            out.append(f"{len(keywords)} keywords (contract {self.min_keywords}-{self.max_keywords})")
        dupes = len(raw_keywords) - len(keywords)
        if dupes:
            out.append(f"{dupes} duplicate or empty keyword(s)")
        stop = [k for k in keywords if is_stopword_phrase(k)]
        if stop:
            out.append(f"stopword keyphrase(s) {stop[:3]}")
        same = [k for k in keywords if is_repeated_word_phrase(k)]
        if same:
            out.append(f"repeated-word keyphrase(s) {same[:3]}")
        run, count = repeated_run(description, self.repeat_run_words, self.max_run_repeats)
        if run:
            out.append(f"description repeats {run!r} {count} times (contract: a {self.repeat_run_words}-word run "
                       f"at most {self.max_run_repeats} times)")
        long = [k for k in keywords if len(k.split()) > self.max_keyword_words]
        if long:
            out.append(f"{len(long)} keyphrase(s) longer than {self.max_keyword_words} words")
        if URL_RE.search(description) or any(URL_RE.search(k) for k in keywords):
            out.append("URL in the answer")
        copied = self.copied_run(description)
        if copied:
            out.append(f"copies the instruction ({copied!r})")
        return out

    def copied_run(self, description: str) -> str:
        """The first run of ``instruction_copy_words`` words shared with the instruction ('' if none)."""
        n = self.instruction_copy_words
        if n <= 0 or not self.instruction:
            return ""
        ref = _WORD_RE.findall(self.instruction.lower())
        grams = {tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)}
        words = _WORD_RE.findall(description.lower())
        for i in range(len(words) - n + 1):
            if tuple(words[i:i + n]) in grams:
                return " ".join(words[i:i + n])
        return ""


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


def parse_answer(text: str, contract: Contract | None = None) -> tuple[str, list[str], list[str]]:
    """Validate one teacher answer; with ``contract``, its violations are errors (else warnings).

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
    if contract is not None:
        broken = contract.violations(desc, keywords, kws_in)
        if broken:
            raise AnswerError("contract: " + "; ".join(broken))
    warnings = record_warnings(desc, keywords)
    if len(keywords) < len(kws_in):
        warnings.append(f"{len(kws_in) - len(keywords)} empty or duplicate keywords dropped")
    if surrounded:
        warnings.append("text around the JSON object")
    return desc, keywords, warnings
