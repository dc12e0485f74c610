"""Schema-guided teacher decoding for the hf engine (METHOD.md 1.4). No Ray.

A small instruct model (SmolLM2-135M) knows what to say about a product family but loses the JSON
shape: it repeats item lines and never closes the object. The guided attempt keeps the model as the
author of every word and lets the decoder hold the structure:

1. The assistant turn is prefilled with ``{"description": "`` and the description is generated
   greedily (batched ``generate``; ``teacher.guided_repetition_penalty`` and
   ``teacher.guided_no_repeat_ngram_size`` apply to the answer only, so the opening the prompt asks
   for, "This product family", stays allowed) with newlines, escapes and markup characters
   (:data:`BANNED_CHARS`) forbidden, until the model writes a ``"`` (allowed after
   ``teacher.guided_min_description_tokens`` tokens and ``teacher.min_description_words`` words)
   or end of turn (past the word minimum, the first sentence end closes it), or reaches
   ``teacher.guided_description_tokens``. At the cap the text is cut at
   its last complete sentence (warning ``description truncated at token cap``); nothing left is a
   failure.
2. The keywords are generated for the whole batch in lockstep, continuing the description's KV cache
   (no prompt is encoded twice): the decoder appends ``", "keywords": ["`` and each row's model
   writes one keyphrase until ``"`` (at most ``teacher.guided_keyword_tokens`` tokens); then ``", "``
   is appended and the next one follows. Rows advance independently (per-row attention mask and
   positions; a row that is done feeds nothing).
   The contract is applied while decoding, not only afterwards: a keyphrase closes at the contract's
   ``max_keyword_words`` (no token may open another word), at ``teacher.guided_keyword_tokens`` only a
   closing token is allowed, and a close that would give an unusable keyphrase (fewer than two letters, a
   case-insensitive repeat, stopword-only such as "BE", a URL: :meth:`GuidedDecoder.phrase_problem`) is
   refused, so the model writes on. The list ends at ``teacher.guided_max_keywords``, or when the model
   closes it (end of turn) once it holds ``teacher.guided_min_keywords``. A keyphrase that cannot close
   validly within the token cap is dropped from the record (the model sees it and goes on):
   :data:`MAX_DROPPED` of them end a list that is long enough, :data:`MAX_DROPPED_SHORT` end any list.
   List punctuation (``,;:``) inside a keyphrase is only allowed fused with the closing quote. Fewer than
   ``teacher.guided_min_keywords`` is a failure with that reason.
3. The assembled JSON (``json.dumps`` of the generated strings) is the raw answer; the caller runs
   it through the same ``parse_answer`` validation (and contract) as every other attempt, and records
   the warning ``guided decoding`` plus the decoding warnings above. A failed row keeps the model's
   raw text (the prefill, the description as generated, every keyphrase including dropped ones).

Used by :class:`tsrec.semantics.teacher.HFTeacher` as its final attempt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tsrec.semantics.answers import keyphrase_problem

KEYWORDS_OPEN = '", "keywords": ["'
KEYWORD_SEP = '", "'
GUIDED_WARNING = "guided decoding"
# Also parentheses: a small model copies the numbered item listing ("1) ... 2) ..."). Digits are allowed:
# the reference Industrial file has "3D" in 18 of 560 descriptions, and "12V", "3D printing" are keyphrases.
BANNED_CHARS = "\n\r\t\\[]{}<>|*#_`()"
DESCRIPTION_OPEN = '{"description": "'
# Dropped keyphrases that end a list once it holds min_keywords (the model is repeating itself) ...
MAX_DROPPED = 6
# ... and that end it regardless: a bound on decoding time for a row that never reaches min_keywords.
MAX_DROPPED_SHORT = 16
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass
class KeywordStep:
    """One decision of the keyword phase for one row: continue with ``token``, or close the keyphrase
    (``token`` None) as ``keyphrase`` (kept when ``keep``), feeding ``tail`` (the text the model wrote before
    its quote in that token) and ending the list when ``end_list``."""

    token: int | None = None
    keyphrase: str = ""
    keep: bool = False
    tail: str = ""
    end_list: bool = False


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


def torch_isfinite_any(row: Any) -> bool:
    """Whether any entry of a logits row is still allowed (finite)."""
    import torch

    return bool(torch.isfinite(row).any())


def ngram_bans(answer_ids: list[int], n: int) -> list[int]:
    """Tokens that would repeat an ``n``-gram of ``answer_ids`` (the answer only: the prompt is not looked at,
    so the opening the prompt asks for, "This product family", is never banned)."""
    if n <= 0 or len(answer_ids) < n:
        return []
    head = tuple(answer_ids[len(answer_ids) - n + 1:])
    return sorted({answer_ids[i + n - 1] for i in range(len(answer_ids) - n + 1)
                   if tuple(answer_ids[i:i + n - 1]) == head})


class GuidedDecoder:
    """Schema-guided greedy decoding with a loaded causal LM and its tokenizer (left padding).

    Args:
        model: a transformers causal LM in eval mode.
        tok: its tokenizer (``padding_side='left'``, pad token set).
        description_tokens: token cap of the description.
        keyword_tokens: token cap of one keyphrase.
        max_keywords: keyphrases generated at most.
        min_keywords: fewer keyphrases is a failure (the list cannot close before).
        repetition_penalty: HF-style penalty on tokens already in the answer (1.0 = off).
        no_repeat_ngram_size: forbid repeating any n-gram of the description (0 = off).
        min_description_tokens: the description cannot close (quote or end of turn) before this many tokens.
        min_words: ... nor before this many words.
        max_keyword_words: a keyphrase closes at this many words (the contract's ``max_keyword_words``; 0 = no limit):
            from then on no token may start another word.
    """

    def __init__(self, model: Any, tok: Any, description_tokens: int = 120, keyword_tokens: int = 8,
                 max_keywords: int = 20, min_keywords: int = 3, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, min_description_tokens: int = 0, min_words: int = 0,
                 max_keyword_words: int = 0):
        import torch

        self.model, self.tok = model, tok
        self.description_tokens, self.keyword_tokens = description_tokens, keyword_tokens
        self.max_keywords, self.min_keywords = max_keywords, min_keywords
        self.repetition_penalty, self.no_repeat_ngram_size = repetition_penalty, no_repeat_ngram_size
        self.min_description_tokens, self.min_words = min_description_tokens, min_words
        self.max_keyword_words = max_keyword_words
        self.device = next(model.parameters()).device
        vocab = model.get_output_embeddings().weight.shape[0]
        pieces = tok.batch_decode([[i] for i in range(min(vocab, len(tok)))])
        self.pieces = pieces + [""] * (vocab - len(pieces))
        self.eos_ids = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        # Inside a JSON string: plain prose. No line breaks or escapes, no markup or template characters
        # (a small model otherwise writes "[product_family]" placeholders, tables and SID-like "<...>"),
        # and no special tokens other than end-of-turn (which ends the string like a quote).
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
        self.stop_set = set(self.stop.tolist())
        self.is_stop = torch.zeros(len(self.pieces), dtype=torch.bool, device=self.device)
        self.is_stop[self.stop] = True
        # Tokens that would start another word of a keyphrase (whitespace before text in what the token adds
        # to the keyphrase, i.e. before its quote; or any whitespace in a non-closing token): banned once the
        # keyphrase holds max_keyword_words words, so it ends there with a closing quote or the current word.
        self.opens_word = torch.tensor(
            [bool(re.search(r"\s\S", p.split('"', 1)[0])) if '"' in p else any(c.isspace() for c in p)
             for p in self.pieces], dtype=torch.bool, device=self.device)
        # A piece that starts with a space starts a word: a cheap word count of generated ids.
        self.starts_word = torch.tensor([p[:1].isspace() for p in self.pieces], dtype=torch.bool, device=self.device)
        self.ends_sentence = torch.tensor([p.rstrip()[-1:] in (".", "!", "?") and '"' not in p for p in self.pieces],
                                          dtype=torch.bool, device=self.device)

    # ----------------------------------------------------------------------------------------------

    def __call__(self, prompts: list[str]) -> list[GuidedResult]:
        """Guided answers for chat-templated prompts that end with the ``{"description": "`` prefill."""
        if not prompts:
            return []
        state = self._descriptions(prompts)
        descs = [d for d, _, _, _ in state["rows"]]
        active = [not err for _, _, err, _ in state["rows"]]
        kw_out = self._keywords(state, active)
        results = []
        for b, (desc, warns, err, transcript) in enumerate(state["rows"]):
            if err:
                results.append(GuidedResult(transcript, warns, err))
                continue
            keywords, kw_warns, kw_raw = kw_out[b]
            if len(keywords) >= self.min_keywords:
                raw = json.dumps({"description": descs[b], "keywords": keywords}, ensure_ascii=False)
                results.append(GuidedResult(raw, [GUIDED_WARNING, *warns, *kw_warns]))
            else:  # keep what the model wrote, dropped keyphrases included
                raw = transcript + KEYWORDS_OPEN + KEYWORD_SEP.join(kw_raw)
                results.append(GuidedResult(raw, [GUIDED_WARNING, *warns, *kw_warns],
                                            f"guided decoding: {len(keywords)} keyword(s), fewer than {self.min_keywords}"))
        return results

    def _descriptions(self, prompts: list[str]) -> dict[str, Any]:
        """Batched greedy description step. Returns the generation state for the keyword step and, per
        row, ``(description, warnings, error, raw transcript)``."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        dec = self
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        start = enc["input_ids"].shape[1]

        class _Answer:  # a LogitsProcessor; every rule looks at the answer only, never at the prompt
            def __call__(self, input_ids, scores):
                gen = input_ids[:, start:]
                scores[:, dec.banned] = -float("inf")
                if dec.repetition_penalty != 1.0 and gen.shape[1]:
                    s = scores.gather(1, gen)
                    scores.scatter_(1, gen, torch.where(s > 0, s / dec.repetition_penalty, s * dec.repetition_penalty))
                if dec.no_repeat_ngram_size:
                    for b, row in enumerate(gen.tolist()):
                        ban = ngram_bans(row, dec.no_repeat_ngram_size)
                        if ban:
                            scores[b, ban] = -float("inf")
                words = dec.starts_word[gen].sum(1) + (1 if gen.shape[1] else 0)
                early = (words < dec.min_words) | (gen.shape[1] < dec.min_description_tokens)
                if early.any():
                    rows = early.nonzero().flatten()
                    scores[rows.unsqueeze(1), dec.stop.unsqueeze(0)] = -float("inf")
                if dec.min_words and gen.shape[1]:
                    # Past the word minimum, the first sentence end closes the description: a small model
                    # otherwise runs on into the cap, and the cut at the last sentence can fall below the minimum.
                    done = dec.ends_sentence[gen[:, -1]] & ~early
                    if done.any():
                        rows = done.nonzero().flatten()
                        keep = scores[rows.unsqueeze(1), dec.quote.unsqueeze(0)]
                        scores[rows] = -float("inf")
                        scores[rows.unsqueeze(1), dec.quote.unsqueeze(0)] = keep
                return scores

        class _StopAtQuote(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.isin(input_ids[:, -1], dec.stop)

        cfg = GenerationConfig(
            max_new_tokens=self.description_tokens, do_sample=False, num_beams=1, temperature=None, top_k=None,
            top_p=None, pad_token_id=self.tok.pad_token_id, eos_token_id=sorted(self.eos_ids),
            bos_token_id=self.tok.bos_token_id, return_dict_in_generate=True)
        with torch.inference_mode():
            out = self.model.generate(**enc, generation_config=cfg,
                                      logits_processor=LogitsProcessorList([_Answer()]),
                                      stopping_criteria=StoppingCriteriaList([_StopAtQuote()]))
        seqs, cache = out.sequences, out.cache
        cache_len = cache.get_seq_length()  # the cache holds seqs[:, :cache_len] (not the last sampled token)
        mask = torch.cat([enc["attention_mask"], torch.ones(len(prompts), cache_len - start, dtype=enc["attention_mask"].dtype,
                                                            device=self.device)], dim=1)
        rows, feeds = [], []
        for b, gen in enumerate(seqs[:, start:].tolist()):
            stop_at = next((i for i, t in enumerate(gen) if t in self.stop_set), None)
            transcript = DESCRIPTION_OPEN + self.tok.decode(gen, skip_special_tokens=True)
            warns: list[str] = []
            if stop_at is not None:  # closed: the text before the quote (end of turn: nothing)
                piece = self.pieces[gen[stop_at]]
                tail = piece.split('"', 1)[0] if '"' in piece else ""
                keep, rest, text = stop_at, tail, self.tok.decode(gen[:stop_at]) + tail
            else:  # at the cap: up to the last complete sentence; keep the tokens that spell a prefix of it
                full = self.tok.decode(gen)
                text = cut_at_sentence(full)
                warns.append("description truncated at token cap")
                clause = max(full.rfind(";"), full.rfind(","))
                if len(text.split()) < self.min_words and clause > 0 and len(full[:clause].split()) >= self.min_words:
                    # The last sentence end would leave too few words: end at the last clause instead.
                    text = full[:clause].strip() + "."
                    warns.append("description ended at a clause")
                keep, rest = 0, text
                for k in range(len(gen), 0, -1):
                    head = self.tok.decode(gen[:k]).lstrip()
                    if text.startswith(head):
                        keep, rest = k, text[len(head):]
                        break
            desc = " ".join(text.split())
            err = "" if desc else ("guided decoding: empty description" if stop_at is not None else
                                   "guided decoding: no complete description sentence within the token cap")
            rows.append((desc, warns, err, transcript))
            # The cache continues after gen[:keep]: mask what follows, feed what is missing plus the list opening.
            first = cache_len - start
            mask[b, start + min(keep, first):] = 0
            feeds.append([] if err else gen[min(keep, first):keep] +
                         self.tok(rest + KEYWORDS_OPEN, add_special_tokens=False)["input_ids"])
        return {"cache": cache, "mask": mask, "feeds": feeds, "rows": rows}

    def phrase_problem(self, keyphrase: str, kept_lower: set[str]) -> str:
        """Why a keyphrase may not close as it is ('' = it may): fewer than two letters, a repeat of a kept one
        (case-insensitive), or a contract breach of its own (stopword-only, URL, too many words)."""
        if sum(c.isalpha() for c in keyphrase) < 2:
            return "letterless"
        if keyphrase.lower() in kept_lower:
            return "repeat"
        return keyphrase_problem(keyphrase, self.max_keyword_words)

    def _keyword_step(self, row: Any, toks: list[int], n_kept: int, kept_lower: set[str]) -> KeywordStep:
        """Choose the next move of one row in the keyword phase from its (penalised) logits ``row``.

        Greedy, with the contract applied at decode time rather than after: the list may end only once it
        holds ``min_keywords``; at ``max_keyword_words`` words no token may open another word; at the token
        cap only a closing token is allowed; and a close that would give an invalid keyphrase (see
        :meth:`phrase_problem`) is refused, so the model writes on ("BE" -> "BE safe tools") instead of
        the keyphrase being dropped. Only a keyphrase that cannot close validly within the cap is dropped.
        """
        text = self.tok.decode(toks) if toks else ""
        if n_kept + 1 < self.min_keywords:  # end of turn now would leave the list short even if this one is valid
            row[self.eos] = -float("inf")
        if len(toks) >= self.keyword_tokens:
            row[~self.is_stop] = -float("inf")
        elif self.max_keyword_words and len(text.split()) >= self.max_keyword_words:
            row[self.opens_word] = -float("inf")
        for _ in range(2):  # the model's choice; if that is a refused close, its best non-closing token
            if not torch_isfinite_any(row):
                break
            t = int(row.argmax())
            piece = self.pieces[t]
            if t in self.eos_ids:
                tail, end_list = "", True
            elif '"' in piece:  # a quote closes the keyphrase only ('"]' holds a bracket: banned in strings)
                tail, end_list = piece.split('"', 1)[0], False
            else:
                return KeywordStep(token=t)
            kw = " ".join((text + tail).split())
            if not self.phrase_problem(kw, kept_lower):
                return KeywordStep(None, kw, True, tail, end_list)
            if end_list and n_kept >= self.min_keywords:  # the model ends a list that is long enough
                return KeywordStep(None, kw, False, "", True)
            row[self.stop] = -float("inf")
        # Nothing allowed is left (at the token cap, no valid close): the keyphrase is dropped.
        return KeywordStep(None, " ".join(text.split()), False, "", False)

    def _keywords(self, state: dict[str, Any], active: list[bool]) -> list[tuple[list[str], list[str], list[str]]]:
        """Keyphrases for every active row, in lockstep on the description's KV cache.

        Returns per row ``(keywords, warnings, raw keyphrases)`` (raw: every generated one, dropped included).
        """
        import torch

        n_rows = len(active)
        cache, mask = state["cache"], state["mask"]
        logits = torch.zeros(n_rows, len(self.pieces), device=self.device)

        def feed(chunks: list[list[int]]) -> None:
            nonlocal cache, mask, logits
            width = max(len(c) for c in chunks)
            if width == 0:
                return
            pad = self.tok.pad_token_id
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunks], device=self.device)
            new = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunks], dtype=mask.dtype,
                               device=self.device)
            mask = torch.cat([mask, new], dim=1)
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -width:]
            o = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            cache = o.cache
            for b, c in enumerate(chunks):
                if c:  # left padding within the chunk: the last position is the row's last real token
                    logits[b] = o.logits[b, -1].float()

        keywords: list[list[str]] = [[] for _ in range(n_rows)]
        lowered: list[set[str]] = [set() for _ in range(n_rows)]  # case-insensitive, as the contract compares
        raws: list[list[str]] = [[] for _ in range(n_rows)]
        toks: list[list[int]] = [[] for _ in range(n_rows)]
        seen: list[set[int]] = [set() for _ in range(n_rows)]  # repeats among the keyphrases only
        dropped = [0] * n_rows
        active = [a and self.max_keywords > 0 for a in active]
        with torch.inference_mode():
            feed([f if a else [] for f, a in zip(state["feeds"], active)])
            while any(active):
                scores = logits.clone()
                scores[:, self.banned_kw] = -float("inf")
                chunks: list[list[int]] = []
                for b in range(n_rows):
                    if not active[b]:
                        chunks.append([])
                        continue
                    row = scores[b]
                    if seen[b] and self.repetition_penalty != 1.0:
                        idx = torch.tensor(sorted(seen[b]), device=self.device)
                        s = row[idx]
                        row[idx] = torch.where(s > 0, s / self.repetition_penalty, s * self.repetition_penalty)
                    step = self._keyword_step(row, toks[b], len(keywords[b]), lowered[b])
                    if step.token is not None:  # the keyphrase goes on
                        toks[b].append(step.token)
                        chunks.append([step.token])
                        continue
                    raws[b].append(step.keyphrase)
                    if step.keep:
                        keywords[b].append(step.keyphrase)
                        lowered[b].add(step.keyphrase.lower())
                    elif step.keyphrase or not step.end_list:
                        # Over the token cap mid-word, or a close that no allowed token could make valid: not a
                        # keyphrase. It stays out of the record and the model goes on (it sees what it wrote).
                        dropped[b] += 1
                    if self.repetition_penalty != 1.0:
                        seen[b].update(toks[b])
                    toks[b] = []
                    enough = len(keywords[b]) >= self.min_keywords
                    # MAX_DROPPED ends a list that already meets min_keywords; a shorter one goes on until
                    # MAX_DROPPED_SHORT (a bound, so a model stuck in a loop cannot decode forever).
                    if (step.end_list or len(keywords[b]) >= self.max_keywords or dropped[b] >= MAX_DROPPED_SHORT
                            or (enough and dropped[b] >= MAX_DROPPED)):
                        active[b] = False
                        chunks.append([])
                        continue
                    # What the model wrote before its closing quote (in that token) + the separator.
                    chunks.append(self.tok(step.tail + KEYWORD_SEP, add_special_tokens=False)["input_ids"])
                feed(chunks)
        out = []
        for b in range(n_rows):
            warns = ([f"{dropped[b]} unusable keyphrase(s) dropped (over the token cap or no valid close)"]
                     if dropped[b] else [])
            out.append((keywords[b], warns, raws[b]))
        return out
