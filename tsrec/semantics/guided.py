"""Schema-guided teacher decoding for the hf engine (METHOD.md 1.4). No Ray.

A small instruct model (SmolLM2-135M) knows what to say about a product family but loses the JSON
shape: it repeats item lines and never closes the object. The guided attempt keeps the model as the
author of every word and lets the decoder hold the structure:

1. The assistant turn is prefilled with ``{"description": "`` and the description is generated
   greedily (batched ``generate``, ``teacher.guided_repetition_penalty`` and
   ``teacher.guided_no_repeat_ngram_size``) with newlines, escapes and markup characters
   (:data:`BANNED_CHARS`, also digits) forbidden, until the model writes a ``"`` (allowed after
   ``teacher.guided_min_description_tokens``) or end of turn, or reaches
   ``teacher.guided_description_tokens``. At the cap the text is cut at its last complete sentence
   (warning ``description truncated at token cap``); nothing left is a failure.
2. The keywords are generated one at a time, per row, on a KV cache: the decoder appends
   ``", "keywords": ["`` and the model writes one keyphrase until ``"`` (at most
   ``teacher.guided_keyword_tokens`` tokens); then ``", "`` is appended and the next one follows.
   The list ends at ``teacher.guided_max_keywords``; when the model closes it (``"]`` or end of
   turn, honoured from the ``teacher.guided_min_keywords``-th keyphrase on), or at the third
   unusable keyphrase: over the token cap, letterless (fewer than two letters, e.g. "4") or a
   repeat; those are dropped from the record and the model goes on. List punctuation (``,;:``)
   inside a keyphrase is only allowed fused with the closing quote. Fewer than ``teacher.guided_min_keywords`` is a
   failure with that reason.
3. The assembled JSON (``json.dumps`` of the generated strings) is the raw answer; the caller runs
   it through the same ``parse_answer`` validation as every other attempt, and records the warning
   ``guided decoding`` plus the decoding warnings above.

Used by :class:`tsrec.semantics.teacher.HFTeacher` as its final attempt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

KEYWORDS_OPEN = '", "keywords": ["'
KEYWORD_SEP = '", "'
GUIDED_WARNING = "guided decoding"
# Also digits and parentheses: a small model copies the numbered item listing ("1) ... 2) ...", "10pcs");
# the reference Industrial file has digits in 18 of 560 descriptions (all "3D") and 21 of 11,146 keywords.
BANNED_CHARS = "\n\r\t\\[]{}<>|*#_`()0123456789"
MAX_DROPPED = 3
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class GuidedResult:
    """One guided answer: the assembled JSON (``raw``), decoding warnings, and ``error`` ('' = usable)."""

    raw: str
    warnings: list[str] = field(default_factory=list)
    error: str = ""


def cut_at_sentence(text: str) -> str:
    """``text`` up to and including its last complete sentence ('' when it holds none)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]].strip() if ends else ""


def split_at_quote(text: str) -> tuple[str, str] | None:
    """``(before, after)`` around the first ``"`` in ``text``; None when there is none."""
    if '"' not in text:
        return None
    before, after = text.split('"', 1)
    return before, after


class GuidedDecoder:
    """Schema-guided greedy decoding with a loaded causal LM and its tokenizer (left padding).

    Args:
        model: a transformers causal LM in eval mode.
        tok: its tokenizer (``padding_side='left'``, pad token set).
        description_tokens: token cap of the description.
        keyword_tokens: token cap of one keyphrase.
        max_keywords: keyphrases generated at most.
        min_keywords: fewer keyphrases is a failure.
        repetition_penalty: HF-style penalty on tokens already in the sequence (1.0 = off).
        no_repeat_ngram_size: forbid repeating any n-gram of the sequence in the description (0 = off).
        min_description_tokens: the description cannot close (quote or end of turn) before this many tokens.
    """

    def __init__(self, model: Any, tok: Any, description_tokens: int = 120, keyword_tokens: int = 8,
                 max_keywords: int = 20, min_keywords: int = 3, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, min_description_tokens: int = 0):
        import torch

        self.model, self.tok = model, tok
        self.description_tokens, self.keyword_tokens = description_tokens, keyword_tokens
        self.max_keywords, self.min_keywords = max_keywords, min_keywords
        self.repetition_penalty, self.no_repeat_ngram_size = repetition_penalty, no_repeat_ngram_size
        self.min_description_tokens = min_description_tokens
        self.device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        pieces = tok.batch_decode([[i] for i in range(min(vocab, len(tok)))])
        self.pieces = pieces + [""] * (vocab - len(pieces))
        self.eos_ids = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        # Inside a JSON string: plain prose. No line breaks or escapes, no markup or template characters
        # (a small model otherwise writes "[product_family]" placeholders, tables and SID-like "<...>"),
        # no digits (see BANNED_CHARS), and no special tokens other than end-of-turn (which ends the string
        # like a quote).
        special = set(tok.all_special_ids) - self.eos_ids
        banned = [i for i, p in enumerate(self.pieces)
                  if i in special or any(c in p for c in BANNED_CHARS) or (not p and i not in self.eos_ids)]
        self.banned = torch.tensor(banned, dtype=torch.long, device=self.device)
        # Inside a keyphrase, list punctuation is only allowed fused with the closing quote ('",'): a
        # model listing "staples, tape, glue" in one string is thereby led to close each keyphrase.
        self.banned_kw = torch.tensor(sorted(set(banned) | {i for i, p in enumerate(self.pieces)
                                                            if '"' not in p and any(c in p for c in ",;:")}),
                                      dtype=torch.long, device=self.device)
        self.quote = torch.tensor([i for i, p in enumerate(self.pieces) if '"' in p], dtype=torch.long,
                                  device=self.device)
        self.eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=self.device)
        self.stop = torch.cat([self.quote, self.eos])

    # ----------------------------------------------------------------------------------------------

    def __call__(self, prompts: list[str]) -> list[GuidedResult]:
        """Guided answers for chat-templated prompts that end with the ``{"description": "`` prefill."""
        descriptions = self._descriptions(prompts)
        results = []
        for prompt, (desc, warns, err) in zip(prompts, descriptions):
            if err:
                results.append(GuidedResult(json.dumps({"description": desc}, ensure_ascii=False), warns, err))
                continue
            keywords, kw_warns = self._keywords(prompt + desc + KEYWORDS_OPEN)
            raw = json.dumps({"description": desc, "keywords": keywords}, ensure_ascii=False)
            error = "" if len(keywords) >= self.min_keywords else (
                f"guided decoding: {len(keywords)} keyword(s), fewer than {self.min_keywords}")
            results.append(GuidedResult(raw, [GUIDED_WARNING, *warns, *kw_warns], error))
        return results

    def _descriptions(self, prompts: list[str]) -> list[tuple[str, list[str], str]]:
        """Batched greedy description step: ``(description, warnings, error)`` per prompt."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        stop, start, min_tokens = self.stop, 0, self.min_description_tokens  # start: set once the batch is encoded

        class _Ban:  # a LogitsProcessor: forbid the banned ids; no closing quote before min_tokens
            def __init__(self, ids):
                self.ids = ids

            def __call__(self, input_ids, scores):
                scores[:, self.ids] = -float("inf")
                if input_ids.shape[1] - start < min_tokens:
                    scores[:, stop] = -float("inf")
                return scores

        class _StopAtQuote(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.isin(input_ids[:, -1], stop)

        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        start = enc["input_ids"].shape[1]
        cfg = GenerationConfig(
            max_new_tokens=self.description_tokens, do_sample=False, num_beams=1, temperature=None, top_k=None,
            top_p=None, repetition_penalty=self.repetition_penalty if self.repetition_penalty != 1.0 else None,
            no_repeat_ngram_size=self.no_repeat_ngram_size or None, pad_token_id=self.tok.pad_token_id,
            eos_token_id=sorted(self.eos_ids), bos_token_id=self.tok.bos_token_id)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=cfg,
                                      logits_processor=LogitsProcessorList([_Ban(self.banned)]),
                                      stopping_criteria=StoppingCriteriaList([_StopAtQuote()]))
        res = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            text = self.tok.decode(row, skip_special_tokens=True)
            ended = split_at_quote(text)
            closed = ended is not None or any(t in self.eos_ids for t in row)
            desc = " ".join((ended[0] if ended else text).split())
            warns = []
            if not closed:
                desc = cut_at_sentence(desc)
                warns.append("description truncated at token cap")
            err = "" if desc else ("guided decoding: empty description" if closed else
                                   "guided decoding: no complete description sentence within the token cap")
            res.append((desc, warns, err))
        return res

    def _keywords(self, prefix: str) -> tuple[list[str], list[str]]:
        """Keyphrases one at a time on a KV cache, continuing ``prefix`` (inside the keywords list)."""
        import torch

        ids = self.tok(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
        seen_ids: set[int] = set()  # penalise repeats among the keyphrases only: copying a product type is fine
        keywords: list[str] = []
        warns: list[str] = []
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True)
            cache, logits = out.cache, out.logits[0, -1]

            def feed(new_ids: list[int]):
                nonlocal cache, logits
                o = self.model(input_ids=torch.tensor([new_ids], device=self.device), cache=cache, use_cache=True)
                cache, logits = o.cache, o.logits[0, -1]

            dropped = 0
            while len(keywords) < self.max_keywords:
                toks: list[int] = []
                tail, closed, end_list = "", False, False
                # The model may close the list (end of turn, or ``"]``) only once it holds min_keywords.
                may_end = len(keywords) + 1 >= self.min_keywords
                for _ in range(self.keyword_tokens):
                    scores = logits.float().clone()
                    scores[self.banned_kw] = -float("inf")
                    if not may_end:
                        scores[self.eos] = -float("inf")
                    if seen_ids and self.repetition_penalty != 1.0:
                        idx = torch.tensor(sorted(seen_ids), device=self.device)
                        s = scores[idx]
                        scores[idx] = torch.where(s > 0, s / self.repetition_penalty, s * self.repetition_penalty)
                    t = int(scores.argmax())
                    if t in self.eos_ids:
                        closed = end_list = True
                        break
                    piece = self.pieces[t]
                    if '"' in piece:
                        tail, after = piece.split('"', 1)
                        closed, end_list = True, may_end and after.lstrip().startswith("]")
                        break
                    toks.append(t)
                    feed([t])
                kw = " ".join((self.tok.decode(toks) + tail).split())
                repeat = kw.lower() in {k.lower() for k in keywords}
                usable = closed and sum(c.isalpha() for c in kw) >= 2 and not repeat
                if usable:
                    keywords.append(kw)
                else:
                    # Over the cap, letterless ("4") or a repeat: not a keyphrase. It stays out of the record
                    # and the model goes on; the MAX_DROPPED-th one ends the list.
                    dropped += 1
                if self.repetition_penalty != 1.0:
                    seen_ids.update(toks)
                if end_list or dropped >= MAX_DROPPED:
                    break
                # The model's closing quote (and what it wrote before it in that token) + the separator.
                feed(self.tok(tail + KEYWORD_SEP, add_special_tokens=False)["input_ids"])
        if dropped:
            warns.append(f"{dropped} over-long, letterless or repeated keyphrase(s) dropped")
        return keywords, warns
