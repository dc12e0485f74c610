"""RL rollout generators: the constrained beam search (METHOD.md 1.7 "Rollouts", R1, R8) and
constrained sampling.

Stage: RL rollouts. Input: a causal LM, left-padded prompts, :class:`SidConstraints`, group size G.
Output: :class:`Rollout`, G valid SIDs per prompt in score order, flattened to B*G rows.

Upstream runs one beam search per distinct prompt with ``num_beams = num_return_sequences = G`` and
uses the G returned SIDs (in score order) as the group; beam rank i is the position in that list and
drives the ranking reward. The completion is ``SID + "\\n" + EOS``: pass those ids as ``suffix_ids``.
They are appended after decoding. With ``score_suffix`` (the trainer sets it as ``eval.score_suffix``: on
for upstream prompts) their log-probs are added to each SID's score and the group re-sorted, as the
evaluation decoder ranks its beams (the G SIDs stay the same, only their order, and so the rank penalty,
can change); without it they are not scored (NaN in ``token_logprobs``). The trainer recomputes policy and
reference log-probs of every completion token anyway.

``rl.rollout=sample`` draws the G completions instead (:func:`sample_rollouts`): at each SID level a
code is sampled from the policy's distribution restricted to the catalogue's allowed codes (softmax of
the full-vocabulary log-probs over the allowed set, at ``temperature``), so every completion is a
catalogue SID, duplicates are possible, and the group is an on-policy sample: the policy gradient is
then the gradient of the expected reward. Beam rollouts are the G most likely SIDs instead; each gets
the same weight in the gradient whatever its probability. The drawn rows are sorted by score within
their group, so beam rank i keeps its meaning (the i-th most likely completion of the group) for the
ranking reward. Draws come from an explicit ``torch.Generator``: the trainer seeds it per step, rank and
micro-batch, so a resumed run draws the same completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tsrec.decode.beam import EmptyAllowedSetError, _forward, _level_logprobs, constrained_beam_search, prefill
from tsrec.decode.constraints import SidConstraints


@dataclass
class Rollout:
    """B prompts x G completions, flattened prompt-major (row = b * G + rank).

    Attributes:
        sequences: ``(B*G, T + L + s)`` left-padded prompt + SID + suffix ids.
        attention_mask: ``(B*G, T + L + s)`` 0 on left padding, 1 elsewhere.
        completion_ids: ``(B*G, L + s)`` SID ids followed by the suffix ids.
        token_logprobs: ``(B*G, L + s)`` float32 decoder log-probs of the SID tokens, and of the suffix when
            it was scored (NaN there otherwise).
        beam_ranks: ``(B*G,)`` 0-based rank within the prompt's group.
        prompt_index: ``(B*G,)`` which prompt of the batch.
        sid_index: ``(B*G,)`` index into ``constraints.sids``.
        scores: ``(B*G,)`` sequence score (sum of the SID-token log-probs, plus the suffix's when scored).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_ids: torch.Tensor
    token_logprobs: torch.Tensor
    beam_ranks: torch.Tensor
    prompt_index: torch.Tensor
    sid_index: torch.Tensor
    scores: torch.Tensor


def generate_rollouts(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    constraints: SidConstraints,
    group_size: int,
    suffix_ids: Sequence[int] = (),
    score_suffix: bool = False,
) -> Rollout:
    """G distinct catalogue SIDs per prompt by constrained beam search (the upstream rollout).

    Args:
        model: the policy (any HF causal LM).
        input_ids: ``(B, T)`` left-padded prompts; ``attention_mask`` likewise.
        constraints: the catalogue tables.
        group_size: G = beam width = completions per prompt.
        suffix_ids: ids appended to every completion, e.g. ``[id("\\n"), eos]``.
        score_suffix: add their log-probs to the scores and rank the group by that (the evaluation's
            ``score_suffix_ids``); False: rank by the SID tokens, suffix not scored.

    Raises:
        ValueError / EmptyAllowedSetError: see :func:`constrained_beam_search` (an empty allowed
        set is always an error here: a rollout must never leave the catalogue).
    """
    out = constrained_beam_search(model, input_ids, attention_mask, constraints, group_size, on_empty="raise",
                                  score_suffix_ids=suffix_ids if score_suffix else ())
    return _rollout_from(input_ids, attention_mask, out.sid_token_ids, out.token_logprobs, out.sid_index, out.ranks,
                         suffix_ids, out.suffix_logprobs)


def _rollout_from(input_ids, attention_mask, sid_token_ids, token_logprobs, sid_index, ranks, suffix_ids,
                  suffix_logprobs=None) -> Rollout:
    """Assemble a :class:`Rollout` from ``(B, G, L)`` SIDs and their per-token log-probs (``suffix_logprobs``
    ``(B, G, s)`` when the suffix was scored)."""
    B, G, L = sid_token_ids.shape
    device = input_ids.device
    suffix = torch.tensor(list(suffix_ids), dtype=torch.long, device=device).expand(B * G, len(suffix_ids))
    completion = torch.cat([sid_token_ids.reshape(B * G, L), suffix], dim=1)
    suffix_lp = (torch.full(suffix.shape, float("nan"), device=device) if suffix_logprobs is None
                 else suffix_logprobs.reshape(B * G, -1).float())
    lp = torch.cat([token_logprobs.reshape(B * G, L), suffix_lp], dim=1)
    prompts = input_ids.repeat_interleave(G, dim=0)
    prompt_mask = attention_mask.to(torch.long).repeat_interleave(G, dim=0)
    return Rollout(
        sequences=torch.cat([prompts, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, torch.ones_like(completion)], dim=1),
        completion_ids=completion,
        token_logprobs=lp,
        beam_ranks=ranks.reshape(-1),
        prompt_index=torch.arange(B, device=device).repeat_interleave(G),
        sid_index=sid_index.reshape(-1),
        scores=(token_logprobs.sum(-1) if suffix_logprobs is None
                else token_logprobs.sum(-1) + suffix_logprobs.sum(-1)).reshape(-1),
    )


# no_grad, not inference_mode: the trainer feeds the returned sequences to autograd forwards.
@torch.no_grad()
def sample_rollouts(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    constraints: SidConstraints,
    group_size: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    suffix_ids: Sequence[int] = (),
) -> Rollout:
    """G sampled catalogue SIDs per prompt (constrained sampling; see the module docstring).

    One prefill per prompt, the KV cache expanded to B*G rows, then L single-token steps: per row, the
    allowed codes of its prefix node, their full-vocabulary log-probs, one draw from
    ``softmax(logprob / temperature)`` over the allowed codes. ``token_logprobs`` and ``scores`` are the
    full-vocabulary log-probs at temperature 1 (what the trainer recomputes); rows are sorted by score
    within their group (stable), ``beam_ranks`` = position in that order.

    Raises:
        ValueError: ``group_size`` < 1 or ``temperature`` <= 0.
        PaddingSideError: the batch is not left-padded.
        EmptyAllowedSetError: a prefix with no allowed continuation (corrupt constraint tables).
    """
    G, L = int(group_size), constraints.num_levels
    if G < 1:
        raise ValueError(f"group size {G} must be >= 1")
    if not temperature > 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    device = input_ids.device
    B = input_ids.shape[0]
    cons, attention_mask, cache_kw, logits, cache = prefill(model, input_ids, attention_mask, constraints)
    rows = torch.arange(B, device=device).repeat_interleave(G)
    cache.reorder_cache(rows)  # B -> B*G: every draw of a prompt continues from its one prefill
    logits = logits.index_select(0, rows)
    mask = attention_mask.index_select(0, rows)
    nodes = torch.zeros(B * G, dtype=torch.long, device=device)
    tokens, token_lp = [], []
    for level in range(L):
        child = cons.lookup(level, nodes)  # (B*G, C)
        allowed = child >= 0
        if not bool(allowed.any(-1).all()):
            row = int((~allowed.any(-1)).nonzero()[0])
            raise EmptyAllowedSetError(f"prompt {row // G}, draw {row % G}: empty allowed set at SID level {level} "
                                       "(corrupt constraint tables)")
        code_ids = cons.level_token_ids[level]
        lp = _level_logprobs(logits, code_ids)  # (B*G, C) full-vocabulary log-probs
        probs = torch.softmax((lp / temperature).masked_fill(~allowed, float("-inf")), dim=-1)
        code = torch.multinomial(probs, 1, generator=generator)  # (B*G, 1)
        nodes = child.gather(1, code).squeeze(1)
        tok = code_ids[code.squeeze(1)]
        tokens.append(tok)
        token_lp.append(lp.gather(1, code).squeeze(1))
        if level == L - 1:
            break  # nothing after the last level is scored
        mask = torch.cat([mask, mask.new_ones((B * G, 1))], dim=1)
        logits, cache = _forward(model, cache_kw, tok.unsqueeze(1), mask, mask.sum(-1, keepdim=True) - 1, cache)
    sid_tokens = torch.stack(tokens, dim=-1).view(B, G, L)
    tok_lp = torch.stack(token_lp, dim=-1).view(B, G, L)
    order = torch.sort(tok_lp.sum(-1), dim=-1, descending=True, stable=True).indices  # (B, G)
    sid_tokens = sid_tokens.gather(1, order.unsqueeze(-1).expand_as(sid_tokens))
    tok_lp = tok_lp.gather(1, order.unsqueeze(-1).expand_as(tok_lp))
    sid_index = nodes.view(B, G).gather(1, order)
    ranks = torch.arange(G, device=device).expand(B, G).clone()
    return _rollout_from(input_ids, attention_mask, sid_tokens, tok_lp, sid_index, ranks, suffix_ids)
