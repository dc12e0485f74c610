"""The constrained beam search as the RL rollout generator (METHOD.md 1.7 "Rollouts", R1, R8).

Stage: RL rollouts. Input: a causal LM, left-padded prompts, :class:`SidConstraints`, group size G.
Output: :class:`Rollout`, G distinct valid SIDs per prompt in score order, flattened to B*G rows.

Upstream runs one beam search per distinct prompt with ``num_beams = num_return_sequences = G`` and
uses the G returned SIDs (in score order) as the group; beam rank i is the position in that list and
drives the ranking reward. The completion is ``SID + "\\n" + EOS``: pass those ids as ``suffix_ids``.
They are appended after decoding and are not scored (their log-probs are NaN in
``token_logprobs``); the trainer recomputes policy and reference log-probs of every completion token
anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tsrec.decode.beam import constrained_beam_search
from tsrec.decode.constraints import SidConstraints


@dataclass
class Rollout:
    """B prompts x G completions, flattened prompt-major (row = b * G + rank).

    Attributes:
        sequences: ``(B*G, T + L + s)`` left-padded prompt + SID + suffix ids.
        attention_mask: ``(B*G, T + L + s)`` 0 on left padding, 1 elsewhere.
        completion_ids: ``(B*G, L + s)`` SID ids followed by the suffix ids.
        token_logprobs: ``(B*G, L + s)`` float32 decoder log-probs of the SID tokens, NaN on the suffix.
        beam_ranks: ``(B*G,)`` 0-based rank within the prompt's group.
        prompt_index: ``(B*G,)`` which prompt of the batch.
        sid_index: ``(B*G,)`` index into ``constraints.sids``.
        scores: ``(B*G,)`` sequence score (sum of SID-token log-probs).
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
) -> Rollout:
    """G distinct catalogue SIDs per prompt by constrained beam search (the upstream rollout).

    Args:
        model: the policy (any HF causal LM).
        input_ids: ``(B, T)`` left-padded prompts; ``attention_mask`` likewise.
        constraints: the catalogue tables.
        group_size: G = beam width = completions per prompt.
        suffix_ids: ids appended to every completion, e.g. ``[id("\\n"), eos]`` (not scored).

    Raises:
        ValueError / EmptyAllowedSetError: see :func:`constrained_beam_search` (an empty allowed
        set is always an error here: a rollout must never leave the catalogue).
    """
    out = constrained_beam_search(model, input_ids, attention_mask, constraints, group_size, on_empty="raise")
    B, G, L = out.sid_token_ids.shape
    device = input_ids.device
    suffix = torch.tensor(list(suffix_ids), dtype=torch.long, device=device).expand(B * G, len(suffix_ids))
    completion = torch.cat([out.sid_token_ids.reshape(B * G, L), suffix], dim=1)
    lp = torch.cat([out.token_logprobs.reshape(B * G, L), torch.full(suffix.shape, float("nan"), device=device)], dim=1)
    prompts = input_ids.repeat_interleave(G, dim=0)
    prompt_mask = attention_mask.to(torch.long).repeat_interleave(G, dim=0)
    return Rollout(
        sequences=torch.cat([prompts, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, torch.ones_like(completion)], dim=1),
        completion_ids=completion,
        token_logprobs=lp,
        beam_ranks=out.ranks.reshape(-1),
        prompt_index=torch.arange(B, device=device).repeat_interleave(G),
        sid_index=out.sid_index.reshape(-1),
        scores=out.scores.reshape(-1),
    )
