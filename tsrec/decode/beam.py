"""Batched constrained beam search over catalogue SIDs, on tensors (METHOD.md 1.8; R1, R2, R4, R10).

Stage: evaluation (``tsrec eval``) and RL rollouts (:mod:`tsrec.decode.rollout`).
Input: any Hugging Face causal LM, a left-padded prompt batch, :class:`SidConstraints`, a width K.
Output: :class:`BeamOutput`, the top-K distinct catalogue SIDs per prompt with their scores.

Algorithm (fixed SID length L, so beam search is exactly L steps):
1. Prefill every prompt once (batch B, left padding, position ids from the attention mask); only the
   last position's logits are computed (``logits_to_keep=1``).
2. Level 0 starts from a single live beam per prompt, so duplicates can never appear. At level l
   every live beam looks up its allowed codes and child nodes with one ``index_select`` on the
   level's child table; candidates are ``score + log p(token)`` with log p the **full-vocabulary**
   log-softmax (no renormalisation over the allowed set); disallowed codes are minus infinity.
3. The best K candidates per prompt (stable sort: ties go to the lower beam, then the lower code)
   become the new beams; the KV cache is reordered to them (``Cache.reorder_cache``; the first
   reorder also expands B -> B*K) and their tokens are fed for the next level.
4. After level L every beam is a complete, distinct catalogue SID. Score = sum of the L level
   log-probabilities; nothing after the last level (``\\n``, EOS) is scored or decoded, unless
   ``score_suffix_ids`` asks for the upstream scoring (``prompts.mode=upstream``, METHOD.md 1.8): then
   those forced ids are fed after the SID, their log-probabilities added, and the K beams re-sorted.

Input checks: the batch must be left-padded (:class:`PaddingSideError`); wrapped models (peft,
DeepSpeed, DDP) are called as given, with the cache keyword of the HF module inside.

The search is exact for what it keeps: if K >= the number of prefixes at every level, the top-K
equals exhaustive scoring of the catalogue. It is the same search as transformers' beam search with
a ``prefix_allowed_tokens_fn`` restricted to the SID levels, ``length_penalty=0`` and
``do_sample=False``. No model generation config is read, so no sampling, temperature, top-k/p or
repetition penalty can leak in (R2).

Width. K must not exceed the number of catalogue SIDs (ValueError). Then every returned beam is a
valid SID: a level keeps min(K, number of prefixes) beams and every prefix has a child. A live beam
with an empty allowed set means a corrupt table: an error (``on_empty="raise"``, the default) or a
killed, counted beam (``on_empty="count"``), never an unconstrained step (R1).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from tsrec.decode.constraints import SidConstraints

NEG_INF = float("-inf")


class EmptyAllowedSetError(RuntimeError):
    """A live beam reached a prefix with no allowed continuation."""


@dataclass
class BeamOutput:
    """Top-K SIDs per prompt, best first.

    Attributes:
        sid_token_ids: ``(B, K, L)`` token ids of the returned SIDs.
        sid_index: ``(B, K)`` index into ``constraints.sids`` (-1: dead beam, only with ``on_empty="count"``).
        scores: ``(B, K)`` float32 sum of the L full-vocabulary log-probabilities (-inf: dead beam).
        token_logprobs: ``(B, K, L)`` float32 log-probability of each SID token.
        ranks: ``(B, K)`` 0-based beam rank (position in the score-sorted list).
        sequences: ``(B, K, T + L)`` the left-padded prompt followed by the SID tokens.
        empty_events: ``(B,)`` live beams per prompt that hit an empty allowed set (0 unless the tables are corrupt).
        suffix_logprobs: ``(B, K, S)`` float32 log-probabilities of the scored suffix ids (``score_suffix_ids``
            only; included in ``scores``), else None.
    """

    sid_token_ids: torch.Tensor
    sid_index: torch.Tensor
    scores: torch.Tensor
    token_logprobs: torch.Tensor
    ranks: torch.Tensor
    sequences: torch.Tensor
    empty_events: torch.Tensor | None = None
    suffix_logprobs: torch.Tensor | None = None

    def sid_strings(self, constraints: SidConstraints) -> list[list[str]]:
        """``[prompt][rank]`` SID strings ("" for a dead beam)."""
        return [[constraints.sids[i] if i >= 0 else "" for i in row] for row in self.sid_index.tolist()]


def unwrap_model(model):
    """The Hugging Face module inside training wrappers (DeepSpeed engine, DDP/FSDP, peft, torch.compile).

    Wrappers forward ``**kwargs`` and hide the real signature, so keyword detection must look at the
    module they wrap. peft is unwrapped through its own ``get_base_model`` (LoRA layers are injected
    into the base modules, so nothing is lost); the others store the wrapped module as ``.module``
    (DeepSpeed, DDP) or ``._orig_mod`` (``torch.compile``).
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
    return model


def cache_keyword(model) -> str:
    """The cache keyword of the wrapped HF module's forward.

    transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (the old name is deprecated and
    announced for removal); a wrapper's ``forward(*args, **kwargs)`` shows neither, so the signature
    is read from the unwrapped module. The call itself still goes through the wrapper (peft prompt
    adapters, DeepSpeed hooks).
    """
    params = inspect.signature(unwrap_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


class PaddingSideError(ValueError):
    """The prompt batch is not left-padded (a row has padding after its last token)."""


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Raise :class:`PaddingSideError` unless every row is ``0...0 1...1`` with at least one 1.

    Decoding appends SID tokens after the last column and reads that column's logits, so a
    right-padded row would continue from a pad token: wrong lists, silently.
    """
    m = attention_mask.to(torch.long)
    bad = (m[:, -1] != 1) | (m.diff(dim=-1) < 0).any(-1) if m.shape[1] > 1 else m[:, -1] != 1
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise PaddingSideError(
            f"prompt {row} is not left-padded (attention mask ends ...{m[row].tolist()[-8:]}; must be 0...0 1...1); "
            "use tsrec.decode.beam.left_pad or tokenizer.padding_side='left'"
        )


def _forward(model, cache_kw: str, input_ids, attention_mask, position_ids, cache):
    kwargs = {cache_kw: cache} if cache is not None else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        return_dict=True,
        **kwargs,
    )
    return out.logits[:, -1, :].float(), returned_cache(out)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, constraints: SidConstraints):
    """Checks and the prompt forward every SID decoder starts with (beam search, sampled rollouts).

    Returns ``(constraints on the ids' device, int64 mask, cache keyword, last-position logits, cache)``.
    Raises :class:`PaddingSideError` unless the batch is left-padded.
    """
    cons = constraints.to(input_ids.device)
    attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    check_left_padded(attention_mask)
    cache_kw = cache_keyword(model)
    # Left padding: positions count real tokens only (pads get a dummy position, masked anyway).
    positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    logits, cache = _forward(model, cache_kw, input_ids, attention_mask, positions, None)
    return cons, attention_mask, cache_kw, logits, cache


def _level_logprobs(logits: torch.Tensor, code_ids: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary float32 log-softmax, evaluated only at the level's code columns.

    ``logits[:, codes] - logsumexp(logits)`` equals ``log_softmax(logits)[:, codes]`` (no
    renormalisation over the allowed set) without writing a (rows, vocab) output.
    """
    return logits.index_select(-1, code_ids) - torch.logsumexp(logits, dim=-1, keepdim=True)


# no_grad, not inference_mode: RL trainers feed the returned sequences to autograd forwards.
@torch.no_grad()
def constrained_beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    constraints: SidConstraints,
    beams: int,
    *,
    on_empty: Literal["raise", "count"] = "raise",
    score_suffix_ids: Sequence[int] = (),
) -> BeamOutput:
    """Top-``beams`` distinct catalogue SIDs per prompt (see the module docstring).

    Args:
        model: a Hugging Face causal LM (``logits_to_keep`` and a reorderable cache).
        input_ids: ``(B, T)`` left-padded prompt ids.
        attention_mask: ``(B, T)`` 1 for prompt tokens, 0 for left padding.
        constraints: the catalogue tables (moved to the ids' device if needed).
        beams: K, the beam width = number of returned SIDs.
        on_empty: ``raise`` (default) or ``count`` when a live beam has no allowed continuation.
        score_suffix_ids: ids forced after every SID and added to its score (upstream parity: the
            public trie ends every SID with ``\n`` and EOS, METHOD.md 1.8). The K beams kept after the
            last SID level are rescored with these terms and re-sorted (stable), exactly what a
            beam search does when each beam has a single allowed continuation. Empty (default): the
            tsrec contract, nothing after the SID is scored.

    Raises:
        ValueError: ``beams`` < 1 or larger than the number of catalogue SIDs.
        PaddingSideError: the batch is not left-padded.
        EmptyAllowedSetError: a live beam has an empty allowed set and ``on_empty="raise"``.
    """
    K, L = int(beams), constraints.num_levels
    if K < 1 or K > constraints.num_sids:
        raise ValueError(f"beam width {K} must be in 1..{constraints.num_sids} (the number of catalogue SIDs)")
    device = input_ids.device
    B, T = input_ids.shape
    suffix = [int(i) for i in score_suffix_ids]
    cons, attention_mask, cache_kw, logits, cache = prefill(model, input_ids, attention_mask, constraints)

    arange_b = torch.arange(B, device=device)
    scores = torch.zeros((B, 1), device=device)  # one live beam per prompt at level 0
    nodes = torch.zeros((B, 1), dtype=torch.long, device=device)
    tokens = torch.empty((B, 1, 0), dtype=torch.long, device=device)
    token_lp = torch.empty((B, 1, 0), device=device)
    empty_events = torch.zeros(B, dtype=torch.long, device=device)

    for level in range(L):
        width = nodes.shape[1]
        child = cons.lookup(level, nodes)  # (B, W, C)
        allowed = child >= 0
        live = torch.isfinite(scores)
        empty = live & ~allowed.any(-1)
        if bool(empty.any()):
            if on_empty == "raise":
                b, w = (int(x) for x in empty.nonzero()[0])
                raise EmptyAllowedSetError(
                    f"prompt {b}, beam {w}: empty allowed set at SID level {level} (corrupt constraint tables)"
                )
            empty_events += empty.sum(-1)
        code_ids = cons.level_token_ids[level]
        C = code_ids.numel()
        lp = _level_logprobs(logits, code_ids).view(B, width, C)  # full-vocabulary log-probs
        cand = (scores.unsqueeze(-1) + lp.masked_fill(~allowed, NEG_INF)).view(B, width * C)
        # Stable descending sort: deterministic tie-break by (beam, code) order.
        top_scores, top_idx = torch.sort(cand, dim=-1, descending=True, stable=True)
        top_scores, top_idx = top_scores[:, :K], top_idx[:, :K]
        if top_scores.shape[1] < K:  # level 0 with fewer codes than K: pad with dead beams
            pad = K - top_scores.shape[1]
            top_scores = torch.cat([top_scores, top_scores.new_full((B, pad), NEG_INF)], dim=1)
            top_idx = torch.cat([top_idx, top_idx.new_zeros((B, pad))], dim=1)
        origin, code = top_idx // C, top_idx % C
        dead = ~torch.isfinite(top_scores)
        nodes = child.view(B, width * C).gather(1, top_idx).masked_fill(dead, -1)
        new_tok = code_ids[code]
        new_lp = lp.view(B, width * C).gather(1, top_idx)
        tokens = torch.cat([tokens.gather(1, origin.unsqueeze(-1).expand(-1, -1, level)), new_tok.unsqueeze(-1)], dim=-1)
        token_lp = torch.cat([token_lp.gather(1, origin.unsqueeze(-1).expand(-1, -1, level)), new_lp.unsqueeze(-1)], dim=-1)
        scores = top_scores
        if level == L - 1 and not suffix:
            break  # nothing after the last level is scored: no forward for it
        # Reorder (level 0: expand B -> B*K) the KV cache to the chosen beams, then feed their tokens.
        flat_origin = (arange_b.unsqueeze(1) * width + origin).reshape(-1)
        cache.reorder_cache(flat_origin)
        step_mask = torch.cat(
            [attention_mask.repeat_interleave(K, dim=0), attention_mask.new_ones((B * K, level + 1))], dim=1
        )
        step_pos = (step_mask.sum(-1, keepdim=True) - 1)
        logits, cache = _forward(model, cache_kw, new_tok.reshape(B * K, 1), step_mask, step_pos, cache)

    suffix_lp = None
    if suffix:
        # Every beam has exactly one allowed continuation from here: the beam set is fixed, only the
        # scores change. Cache rows are already aligned to the B*K beams (reordered above).
        parts = []
        for j, sid in enumerate(suffix):
            lp_j = _level_logprobs(logits, torch.tensor([sid], device=device)).view(B, K)
            parts.append(lp_j)
            scores = scores + lp_j  # -inf (dead beams) stays -inf
            if j == len(suffix) - 1:
                break
            step_mask = torch.cat([step_mask, step_mask.new_ones((B * K, 1))], dim=1)
            step_pos = step_mask.sum(-1, keepdim=True) - 1
            feed = torch.full((B * K, 1), sid, dtype=torch.long, device=device)
            logits, cache = _forward(model, cache_kw, feed, step_mask, step_pos, cache)
        suffix_lp = torch.stack(parts, dim=-1)
        scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        nodes = nodes.gather(1, order)
        tokens = tokens.gather(1, order.unsqueeze(-1).expand_as(tokens))
        token_lp = token_lp.gather(1, order.unsqueeze(-1).expand_as(token_lp))
        suffix_lp = suffix_lp.gather(1, order.unsqueeze(-1).expand_as(suffix_lp))

    sequences = torch.cat([input_ids.unsqueeze(1).expand(B, K, T), tokens], dim=-1)
    sid_index = nodes  # at the last level the node id is the leaf (SID) index
    return BeamOutput(
        sid_token_ids=tokens,
        sid_index=sid_index,
        scores=scores,
        token_logprobs=token_lp,
        ranks=torch.arange(K, device=device).expand(B, K).clone(),
        sequences=sequences,
        empty_events=empty_events,
        suffix_logprobs=suffix_lp,
    )


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for a list of id lists, left-padded with ``pad_id`` (pad = EOS upstream)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)
