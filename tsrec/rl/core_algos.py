"""GRPO numerics for the RL stage (METHOD.md 1.7, 3.2; pitfalls R6, R7, R8): pure functions on tensors.

Stage: RL. No Ray, no DeepSpeed: every function takes tensors and returns tensors, so each formula is
unit-tested on its own (tests/rl/). The training loop composes them per step::

    hits  = sid_hits(completion_sid_ids, target_sid_ids)             # (B, G) vs each sample's OWN target (R8)
    R     = ranking_rewards(hits, ranks).total                       # rule + rank penalty
    A_seq = group_advantages(R)                                      # (B, G)
    A_tok = semantic_advantages(semantic_token_rewards(sim, comp_codes, target_codes))   # (B, G, L)
    A     = combine_advantages(reward, A_seq, A_tok, completion_len, semantic_weight)   # (B*G, C)
    logp  = sequence_logprobs(policy, sequences, attention_mask, C)   # logits only at completion positions (R6)
    ref   = sequence_logprobs(reference, ...)                        # no grad
    loss, stats = policy_loss(logp, A, completion_mask, ref_logprobs=ref, beta=beta)

Shapes: B prompts per batch, G completions per prompt (a *group*; rows are prompt-major, row = b*G + i,
as :class:`tsrec.decode.rollout.Rollout` returns them), L SID levels, C completion tokens (L SID
tokens + the suffix ``\\n`` and EOS).

Formulas
--------
**ranking** reward (MiniOneRec ``reward_type=ranking``; METHOD.md 1.7), per group of G completions in
beam-rank order i = 0..G-1::

    r_rule(i) = 1 if completion i equals the target SID, else 0
    r_rank(i) = 0                                            if no completion of the group hits
              = 0                                            for the hit itself
              = -(1 / log2(i + 2)) / sum_{j<G} 1 / log2(j + 2)   for every other completion
    R_i       = w_rule * r_rule(i) + w_rank * r_rank(i)      (w = 1, 1 upstream)

Equality is exact token-id equality with the sample's own target SID (R8, R10), never a lookup through
the prompt text.

**Advantage** per group: ``A_i = (R_i - mean_g R) / (std_g R + eps)``, std the unbiased sample standard
deviation (divisor G - 1), eps = 1e-4. A group with all-equal rewards gets A = 0.

**Loss** (token-level policy gradient with the k3 KL to the reference; METHOD.md 1.7)::

    ratio_t = exp(logp_t - old_t)           old_t = sg(logp_t) when one update per rollout (ratio = 1)
    pg_t    = ratio_t * A_t                                        (updates_per_rollout = 1)
            = min(ratio_t * A_t, clip(ratio_t, 1 - eps_c, 1 + eps_c) * A_t)   (PPO clip, > 1 update)
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1           (k3; 0 when policy = reference)
    l_t     = -(pg_t - beta * KL_t)
    loss    = mean over sequences of ( sum_t mask_t * l_t / sum_t mask_t )

``mask`` covers the completion up to and including the first EOS (:func:`completion_mask`). With the
clip, the first update of a rollout has ratio 1, so its gradient equals the unclipped one.

**semantic** reward (beyond the paper; TS-Rec's token-level semantics used as an RL signal). Each
generated SID token earns credit for how close its meaning is to the target's token at the same level:

    s_{i,l} = sim_l(c_{i,l}, t_l)        c = generated code at level l, t = target code at level l

where ``sim_l`` is a per-level token-similarity table built from the teacher records
(``description_keywords.json``) by :func:`build_token_similarity`:

- ``jaccard`` (default, no model): ``|K_a & K_b| / |K_a | K_b|`` over the two tokens' keyword sets
  (keywords lower-cased, whitespace collapsed);
- ``embedding``: ``max(0, cos(e_a, e_b))`` of the tokens' embedded descriptions (or keyword strings), the
  embedding function injected by the caller; negative cosines give no credit rather than a penalty.

In both, ``sim(a, a) = 1`` (an exact token match earns full credit) and a token without a teacher
record is similar only to itself. The per-token rewards are turned into **per-token advantages** by the
GRPO normalisation applied per level inside each group::

    A^sem_{i,l} = (s_{i,l} - mean_g s_{.,l}) / (std_g s_{.,l} + eps)

so a completion whose first level is right (or close) gets a positive advantage on that token even when
its last level is wrong; the suffix tokens (``\\n``, EOS, forced by the constraints) get A^sem = 0.

The std in that formula has a floor tied to the reward's scale, not only the ``eps`` of the ranking
advantage: ``std_g`` is replaced by ``max(std_g, 1 / sqrt(G))``, the std of a group in which exactly one
completion has similarity 1 (an exact token) and the others 0. Similarities lie in [0, 1], and groups where
almost every completion scores 0 are the common case; with only ``eps`` a single near-zero similarity would
be blown up to a full-size advantage (one 0.02 against fifteen 0s: A = 3.68, an exact hit's scale 3.75).
With the floor that completion gets 0.075, proportional to its similarity, while any group whose spread is
at least that of one exact match (the informative groups) is normalised exactly as GRPO does, so
``w_sem`` keeps its meaning there. A constant group still gets A^sem = 0.

**ranking+semantic**: ``A_{i,t} = A^rank_i + w_sem * A^sem_{i,t}`` (``rl.semantic_weight``), i.e. the
sequence advantage on every completion token plus the semantic per-token advantage on the SID tokens.
Both terms are already group-normalised, so ``w_sem`` is their relative scale.

Guards (R7): :class:`DegenerateRolloutGuard` raises :class:`DegenerateRolloutError` on degenerate
rollouts (completion length, invalid SIDs, constant rewards), from per-step figures the trainer sums over
all workers (``tsrec.rl.loop._global_stats``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

RewardMode = Literal["ranking", "semantic", "ranking+semantic"]
REWARD_MODES = ("ranking", "semantic", "ranking+semantic")
ADV_EPS = 1e-4  # METHOD.md 1.7: A = (R - mean) / (std + 1e-4)


# --------------------------------------------------------------------------------------------------
# Ranking reward (rule + rank penalty)
# --------------------------------------------------------------------------------------------------


def rank_penalties(group_size: int) -> torch.Tensor:
    """``(G,)`` float64: the penalty of a wrong completion at beam rank i, -(1/log2(i+2)) / sum_j 1/log2(j+2).

    For G = 16 the denominator is 6.1060 and the values are METHOD.md 1.7's table (-.1638 ... -.0401).
    """
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    discounts = 1.0 / torch.log2(torch.arange(group_size, dtype=torch.float64) + 2.0)
    return -discounts / discounts.sum()


def sid_hits(completion_sid_ids: torch.Tensor, target_sid_ids: torch.Tensor) -> torch.Tensor:
    """``(B, G)`` bool: completion (b, i) equals the b-th sample's own target SID, token by token (R8).

    Args:
        completion_sid_ids: ``(B, G, L)`` SID token ids of the completions (no suffix).
        target_sid_ids: ``(B, L)`` SID token ids of each sample's target.
    """
    if completion_sid_ids.dim() != 3 or target_sid_ids.dim() != 2:
        raise ValueError(f"expected completions (B, G, L) and targets (B, L), got {tuple(completion_sid_ids.shape)} "
                         f"and {tuple(target_sid_ids.shape)}")
    B, _, L = completion_sid_ids.shape
    if target_sid_ids.shape != (B, L):
        raise ValueError(f"targets {tuple(target_sid_ids.shape)} do not match completions {tuple(completion_sid_ids.shape)}")
    return (completion_sid_ids == target_sid_ids.unsqueeze(1)).all(-1)


@dataclass
class RankingRewards:
    """Per completion ``(B, G)``: the rule part, the rank part and ``total = w_rule*rule + w_rank*rank``."""

    rule: torch.Tensor
    rank: torch.Tensor
    total: torch.Tensor


def ranking_rewards(hits: torch.Tensor, ranks: torch.Tensor | None = None, rule_weight: float = 1.0,
                    rank_weight: float = 1.0) -> RankingRewards:
    """MiniOneRec's ``ranking`` reward for ``(B, G)`` hits (see the module docstring).

    Args:
        hits: ``(B, G)`` bool, from :func:`sid_hits`.
        ranks: ``(B, G)`` 0-based beam rank of each completion; ``None`` = column order (rollouts are
            returned in score order).
        rule_weight, rank_weight: the two reward weights (1, 1 upstream).
    """
    if hits.dim() != 2:
        raise ValueError(f"hits must be (B, G), got {tuple(hits.shape)}")
    B, G = hits.shape
    if ranks is None:
        ranks = torch.arange(G, device=hits.device).expand(B, G)
    if ranks.shape != hits.shape:
        raise ValueError(f"ranks {tuple(ranks.shape)} do not match hits {tuple(hits.shape)}")
    if bool(((ranks < 0) | (ranks >= G)).any()):
        raise ValueError(f"beam ranks must be in 0..{G - 1}")
    hits = hits.bool()
    penalty = rank_penalties(G).to(device=hits.device, dtype=torch.float32)[ranks]
    group_hit = hits.any(dim=1, keepdim=True)
    rule = hits.float()
    # Only groups that contain the target are penalised, and never on the hit itself.
    rank = torch.where(group_hit & ~hits, penalty, torch.zeros_like(penalty))
    return RankingRewards(rule=rule, rank=rank, total=rule_weight * rule + rank_weight * rank)


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS, std_floor: float = 0.0) -> torch.Tensor:
    """GRPO advantages per group: ``(R - mean_g R) / (max(std_g R, std_floor) + eps)``, unbiased std, along dim 1.

    ``rewards`` is ``(B, G)`` (one group per row) or ``(B, G, L)`` (normalised per level: the semantic
    per-token case). A group of one has no standard deviation, so G must be at least 2. ``std_floor`` 0
    (the ranking advantage, upstream) is the plain formula.
    """
    if rewards.dim() not in (2, 3):
        raise ValueError(f"rewards must be (B, G) or (B, G, L), got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group size {rewards.shape[1]} < 2: the unbiased std of a group needs two completions")
    r = rewards.float()
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=True, keepdim=True).clamp(min=std_floor)
    return (r - mean) / (std + eps)


# --------------------------------------------------------------------------------------------------
# Semantic (token-level) reward
# --------------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"<([a-e])_(\d+)>")
_LEVELS = "abcde"


@dataclass
class TokenSimilarity:
    """Per SID level, a ``(C_l, C_l)`` float32 similarity matrix indexed by code number (``<b_7>`` = row 7).

    Diagonal = 1. ``method`` names the similarity (``jaccard`` or ``embedding``) for manifests.
    """

    matrices: list[torch.Tensor]
    method: str

    @property
    def num_levels(self) -> int:
        return len(self.matrices)

    def to(self, device: torch.device | str) -> TokenSimilarity:
        return TokenSimilarity([m.to(device) for m in self.matrices], self.method)


def normalize_keyword(k: str) -> str:
    """Lower-cased, whitespace-collapsed keyword (so "Heavy  Duty" and "heavy duty" are one keyword)."""
    return " ".join(k.lower().split())


def keyword_jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """Jaccard overlap of two keyword sets after :func:`normalize_keyword`; 0 when both are empty."""
    sa = {normalize_keyword(k) for k in a if k.strip()}
    sb = {normalize_keyword(k) for k in b if k.strip()}
    union = sa | sb
    return len(sa & sb) / len(union) if union else 0.0


def build_token_similarity(
    records: Sequence[Mapping[str, Any]],
    num_codes: Sequence[int],
    method: Literal["jaccard", "embedding"] = "jaccard",
    embed_fn: Callable[[list[str]], torch.Tensor] | None = None,
    text: Literal["description", "keywords"] = "description",
) -> TokenSimilarity:
    """Build the per-level token-similarity tables from teacher records (``description_keywords.json``).

    Args:
        records: ``[{"token", "description", "keywords"}]`` as :func:`tsrec.semantics.records.read_teacher_file`
            returns them; tokens of any level, in any order.
        num_codes: codebook size per level (``C_l``); the tables are ``C_l x C_l``.
        method: ``jaccard`` (keyword-set overlap, no model) or ``embedding`` (cosine of embedded texts,
            clamped at 0).
        embed_fn: for ``embedding``: ``texts -> (n, d)`` tensor (injected, e.g. a sentence encoder).
        text: for ``embedding``: embed each record's ``description`` or its keywords joined by ", ".

    Raises:
        ValueError: unknown method, ``embedding`` without ``embed_fn``, a record whose token is not a
            SID token, whose level is beyond ``num_codes`` or whose code is >= ``C_l``.
    """
    if method not in ("jaccard", "embedding"):
        raise ValueError(f"similarity method {method!r} is not jaccard or embedding")
    if method == "embedding" and embed_fn is None:
        raise ValueError("similarity method 'embedding' needs an embed_fn (texts -> (n, d) tensor)")
    by_level: list[dict[int, Mapping[str, Any]]] = [{} for _ in num_codes]
    for n, rec in enumerate(records, start=1):
        tok = rec.get("token")
        m = _TOKEN_RE.fullmatch(tok) if isinstance(tok, str) else None
        if m is None:
            raise ValueError(f"record {n}: token {tok!r} is not a SID token like '<a_12>'")
        level, code = _LEVELS.index(m.group(1)), int(m.group(2))
        if level >= len(num_codes) or code >= num_codes[level]:
            raise ValueError(f"record {n}: token {tok} is outside the codebooks {list(num_codes)}")
        by_level[level][code] = rec
    matrices = []
    for level, size in enumerate(num_codes):
        mat = torch.zeros((size, size), dtype=torch.float32)
        recs = by_level[level]
        codes = sorted(recs)
        if codes and method == "jaccard":
            kw = [[normalize_keyword(k) for k in recs[c]["keywords"]] for c in codes]
            for i, ci in enumerate(codes):
                for j in range(i + 1, len(codes)):
                    mat[ci, codes[j]] = mat[codes[j], ci] = keyword_jaccard(kw[i], kw[j])
        elif codes:
            texts = [recs[c]["description"] if text == "description" else ", ".join(recs[c]["keywords"]) for c in codes]
            emb = torch.as_tensor(embed_fn(texts), dtype=torch.float32)
            if emb.shape[0] != len(texts):
                raise ValueError(f"embed_fn returned {emb.shape[0]} rows for {len(texts)} texts")
            emb = torch.nn.functional.normalize(emb, dim=-1)
            idx = torch.tensor(codes)
            mat[idx.unsqueeze(1), idx.unsqueeze(0)] = (emb @ emb.T).clamp(min=0.0)
        mat.fill_diagonal_(1.0)  # an exact token match earns full credit, with or without a record
        matrices.append(mat)
    return TokenSimilarity(matrices, method)


def sid_code_lookup(token_to_id: Mapping[str, int], vocab_size: int) -> torch.Tensor:
    """``(V,)`` int64: vocabulary id -> code number of a SID token (``<b_7>`` -> 7), -1 for other ids."""
    lookup = torch.full((vocab_size,), -1, dtype=torch.long)
    for tok, i in token_to_id.items():
        m = _TOKEN_RE.fullmatch(tok)
        if m is not None:
            if not 0 <= i < vocab_size:
                raise ValueError(f"token {tok} has id {i} outside the vocabulary of {vocab_size}")
            lookup[i] = int(m.group(2))
    return lookup


def semantic_token_rewards(sim: TokenSimilarity, completion_codes: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """``(B, G, L)`` per-token semantic reward ``s_{i,l} = sim_l(c_{i,l}, t_l)`` against each sample's own target.

    Args:
        sim: the per-level tables (:func:`build_token_similarity`).
        completion_codes: ``(B, G, L)`` code numbers of the generated SID tokens.
        target_codes: ``(B, L)`` code numbers of each sample's target SID.
    """
    if completion_codes.dim() != 3 or target_codes.dim() != 2:
        raise ValueError(f"expected completion codes (B, G, L) and target codes (B, L), got "
                         f"{tuple(completion_codes.shape)} and {tuple(target_codes.shape)}")
    B, G, L = completion_codes.shape
    if target_codes.shape != (B, L):
        raise ValueError(f"target codes {tuple(target_codes.shape)} do not match completions {tuple(completion_codes.shape)}")
    if L > sim.num_levels:
        raise ValueError(f"SIDs have {L} levels but the similarity table has {sim.num_levels}")
    out = torch.empty((B, G, L), dtype=torch.float32, device=completion_codes.device)
    for level in range(L):
        mat = sim.matrices[level].to(completion_codes.device)
        c, t = completion_codes[:, :, level], target_codes[:, level]
        size = mat.shape[0]
        if bool(((c < 0) | (c >= size)).any()) or bool(((t < 0) | (t >= size)).any()):
            raise ValueError(f"level {level}: a code is outside the similarity table (size {size}); "
                             "is every completion token a SID token?")
        out[:, :, level] = mat[c, t.unsqueeze(1).expand(B, G)]
    return out


def semantic_std_floor(group_size: int) -> float:
    """``1 / sqrt(G)``: the unbiased std of a group with one similarity 1 and G - 1 zeros (module docstring)."""
    return 1.0 / math.sqrt(group_size)


def semantic_advantages(token_rewards: torch.Tensor, eps: float = ADV_EPS, std_floor: float | None = None) -> torch.Tensor:
    """``(B, G, L)`` per-token advantages: :func:`group_advantages` per level inside each group, the std
    floored at ``std_floor`` (``None`` = :func:`semantic_std_floor` of G; see the module docstring)."""
    if token_rewards.dim() != 3:
        raise ValueError(f"token rewards must be (B, G, L), got {tuple(token_rewards.shape)}")
    floor = semantic_std_floor(token_rewards.shape[1]) if std_floor is None else std_floor
    return group_advantages(token_rewards, eps, floor)


def combine_advantages(reward: RewardMode, sequence_adv: torch.Tensor | None, token_adv: torch.Tensor | None,
                       completion_len: int, semantic_weight: float = 1.0) -> torch.Tensor:
    """Per-token advantages ``(B*G, C)`` for the loss (rows prompt-major, C = completion tokens).

    - ``ranking``: the sequence advantage ``(B, G)`` on every completion token (upstream).
    - ``semantic``: the per-token advantage ``(B, G, L)`` on the L SID tokens, 0 on the suffix.
    - ``ranking+semantic``: the sum, the semantic part times ``semantic_weight``.
    """
    if reward not in REWARD_MODES:
        raise ValueError(f"reward {reward!r} is not one of {REWARD_MODES}")
    parts = []
    if reward in ("ranking", "ranking+semantic"):
        if sequence_adv is None or sequence_adv.dim() != 2:
            raise ValueError(f"reward {reward!r} needs sequence advantages (B, G)")
        parts.append(sequence_adv.float().reshape(-1, 1).expand(-1, completion_len))
    if reward in ("semantic", "ranking+semantic"):
        if token_adv is None or token_adv.dim() != 3:
            raise ValueError(f"reward {reward!r} needs per-token semantic advantages (B, G, L)")
        B, G, L = token_adv.shape
        if L > completion_len:
            raise ValueError(f"{L} SID tokens do not fit in a completion of {completion_len} tokens")
        tok = torch.zeros((B * G, completion_len), dtype=torch.float32, device=token_adv.device)
        tok[:, :L] = token_adv.float().reshape(B * G, L)
        parts.append(tok * (semantic_weight if reward == "ranking+semantic" else 1.0))
    if len(parts) == 2 and parts[0].shape != parts[1].shape:
        raise ValueError(f"sequence advantages {tuple(parts[0].shape)} and token advantages {tuple(parts[1].shape)} differ in B*G")
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


# --------------------------------------------------------------------------------------------------
# KL, log-probs, loss
# --------------------------------------------------------------------------------------------------


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1.0


def completion_mask(completion_ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``(N, C)`` float mask: completion tokens up to and including the first EOS (all when no EOS)."""
    if eos_id is None:
        return torch.ones_like(completion_ids, dtype=torch.float32)
    is_eos = completion_ids == eos_id
    # Tokens strictly after the first EOS: an EOS occurred at an earlier position.
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after).float()


def completion_logprobs_from_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, completion_ids: torch.Tensor,
                                    temperature: float = 1.0) -> torch.Tensor:
    """``(N, C)`` float32 log-probs of the completion tokens, logits computed only where they are needed (R6).

    The completion occupies the last C positions of each row; token ``S-C+j`` is predicted by the hidden
    state at ``S-C+j-1``, so only the C hidden states ``[S-C-1, S-1)`` go through the LM head: (N, C, V)
    logits instead of (N, S, V).

    Args:
        hidden: ``(N, S, D)`` last hidden states of prompt + completion.
        lm_head: the output projection (``model.get_output_embeddings()``).
        completion_ids: ``(N, C)`` the completion token ids (= the last C input ids).
        temperature: logits are divided by it (1.0 = the beam-search scoring).
    """
    N, S, _ = hidden.shape
    C = completion_ids.shape[1]
    if C < 1 or C >= S:
        raise ValueError(f"completion length {C} must be in 1..{S - 1} (sequence length {S})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    h = hidden[:, S - C - 1 : S - 1, :]
    logits = lm_head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, completion_ids.unsqueeze(-1).to(logits.device)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(lm, sequences: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """``(N, C)`` log-probs of the last ``completion_len`` tokens of left-padded ``sequences`` under ``lm``.

    Runs the decoder once (position ids from the attention mask, as the beam search does) and the LM
    head only at the completion positions (R6).
    """
    mask = attention_mask.to(dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = lm.get_decoder()(input_ids=sequences, attention_mask=mask, position_ids=positions, use_cache=False)
    return completion_logprobs_from_hidden(out.last_hidden_state, lm.get_output_embeddings(),
                                           sequences[:, -completion_len:], temperature)


def grouped_sequence_logprobs(lm, sequences: torch.Tensor, attention_mask: torch.Tensor, completion_len: int,
                              group_size: int, temperature: float = 1.0) -> torch.Tensor:
    """:func:`sequence_logprobs` for prompt-major groups (row ``b * G + g``: G completions of prompt b), with
    each prompt through the decoder once instead of G times.

    A rollout row is a ~100-token prompt and a 4-5 token completion, so the plain forward spends about
    (G - 1) / G of its work re-encoding identical prompts. Here the B prompts run once with a KV cache,
    the cache is repeated G times along the batch (``repeat_interleave`` is differentiable, so the
    completions' gradients reach the prompt's keys and values), and the (B*G, C) completions run on it;
    the first completion token is predicted by the prompt's last hidden state (left padding: the last
    column is always a real token). Same positions and mask as the plain forward, so the log-probs and
    their gradients agree up to float rounding.

    Raises:
        ValueError: the rows are not G identical prompts each (wrong G or layout).
    """
    N, S = sequences.shape
    C, G = completion_len, group_size
    if G < 1 or N % G or not 1 <= C < S:
        raise ValueError(f"{N} rows of length {S} cannot be groups of {G} with {C}-token completions")
    prompts, prompt_mask = sequences[::G, : S - C], attention_mask[::G, : S - C].to(dtype=torch.long)
    if not torch.equal(prompts.repeat_interleave(G, 0), sequences[:, : S - C]):
        raise ValueError(f"the rows are not prompt-major groups of {G} identical prompts")
    from tsrec.decode.beam import cache_keyword, returned_cache  # transformers' `cache` / `past_key_values`

    completions = sequences[:, S - C :]
    decoder = lm.get_decoder()
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
    out = decoder(input_ids=prompts, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    cache = returned_cache(out)
    if cache is None:  # e.g. gradient checkpointing in training turns the cache off: the plain forward then
        raise ValueError("the decoder returned no KV cache (gradient checkpointing?): use sequence_logprobs")
    cache.batch_repeat_interleave(G)
    # Only attention caches with per-layer key/value tensors repeat this way (a hybrid model's linear-attention
    # or placeholder layers would not): check the batch size instead of decoding on a wrong cache.
    if any(getattr(layer, "keys", None) is None or layer.keys.shape[0] != N for layer in getattr(cache, "layers", [None])):
        raise ValueError(f"{type(cache).__name__} of this model does not repeat per group: set "
                         "rl.shared_prompt_forward=false")
    mask = torch.cat([prompt_mask.repeat_interleave(G, 0), attention_mask[:, S - C :].to(dtype=torch.long)], dim=1)
    start = prompt_mask.sum(-1, keepdim=True).repeat_interleave(G, 0)
    positions = start + torch.arange(C, device=sequences.device)
    tail = decoder(input_ids=completions, attention_mask=mask, position_ids=positions, use_cache=True,
                   **{cache_keyword(decoder): cache}).last_hidden_state
    hidden = torch.cat([out.last_hidden_state[:, -1:, :].repeat_interleave(G, 0), tail], dim=1)  # (N, 1 + C, D)
    return completion_logprobs_from_hidden(hidden, lm.get_output_embeddings(), completions, temperature)


@dataclass
class LossStats:
    """Detached diagnostics of one :func:`policy_loss` call (means over masked tokens)."""

    kl: float
    ratio: float
    clip_fraction: float
    tokens: int


def policy_loss(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_eps: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """GRPO loss (module docstring): token-level PG with k3 KL, sequence mean then batch mean.

    Args:
        logprobs: ``(N, C)`` policy log-probs of the completion tokens (with grad).
        advantages: ``(N,)`` sequence advantages or ``(N, C)`` per-token advantages.
        mask: ``(N, C)`` 1 on tokens that count (:func:`completion_mask`).
        old_logprobs: ``(N, C)`` log-probs of the policy that generated the rollout; ``None`` = the
            current policy detached (one update per rollout: ratio 1).
        ref_logprobs: ``(N, C)`` reference log-probs; required when ``beta`` > 0.
        beta: KL coefficient.
        clip_eps: PPO clip range for ``updates_per_rollout`` > 1; ``None`` = no clip (upstream).

    Raises:
        ValueError: shape mismatch, ``beta`` > 0 without ``ref_logprobs``, a sequence with no counted token.
    """
    N, C = logprobs.shape
    if mask.shape != (N, C):
        raise ValueError(f"mask {tuple(mask.shape)} does not match log-probs {(N, C)}")
    if advantages.dim() == 1:
        if advantages.shape[0] != N:
            raise ValueError(f"{advantages.shape[0]} advantages for {N} sequences")
        adv = advantages.float().unsqueeze(1)
    elif advantages.shape == (N, C):
        adv = advantages.float()
    else:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be (N,) or (N, C) = {(N, C)}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs the reference log-probs")
    mask = mask.float()
    lengths = mask.sum(dim=1)
    if bool((lengths <= 0).any()):
        raise ValueError("a completion has no token to train on (empty mask row)")
    old = logprobs.detach() if old_logprobs is None else old_logprobs.detach()
    ratio = torch.exp(logprobs - old)
    pg = ratio * adv
    clipped = torch.zeros_like(pg, dtype=torch.bool)
    if clip_eps is not None:
        pg_clip = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        clipped = pg_clip < pg
        pg = torch.minimum(pg, pg_clip)
    token_loss = -pg
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs.detach())
        if beta > 0:
            token_loss = token_loss + beta * kl
    loss = ((token_loss * mask).sum(dim=1) / lengths).mean()
    n = mask.sum()
    stats = LossStats(
        kl=float((kl.detach() * mask).sum() / n),
        ratio=float((ratio.detach() * mask).sum() / n),
        clip_fraction=float((clipped.float() * mask).sum() / n),
        tokens=int(n),
    )
    return loss, stats


# --------------------------------------------------------------------------------------------------
# Reference model sync
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def mix_into_reference_(ref_params: Iterable[torch.Tensor], policy_params: Iterable[torch.Tensor], alpha: float) -> None:
    """In place: ``ref <- (1 - alpha) * ref + alpha * policy`` (TRL's sync; upstream alpha 0.6 every 512 steps)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"reference sync alpha must be in [0, 1], got {alpha}")
    ref_list, pol_list = list(ref_params), list(policy_params)
    if len(ref_list) != len(pol_list):
        raise ValueError(f"reference has {len(ref_list)} tensors, policy {len(pol_list)}")
    for r, p in zip(ref_list, pol_list):
        if r.shape != p.shape:
            raise ValueError(f"reference tensor {tuple(r.shape)} vs policy {tuple(p.shape)}")
        r.mul_(1.0 - alpha).add_(p.to(dtype=r.dtype, device=r.device), alpha=alpha)


# --------------------------------------------------------------------------------------------------
# Guards (R7)
# --------------------------------------------------------------------------------------------------


class DegenerateRolloutError(RuntimeError):
    """The rollouts of the run are degenerate (invalid SIDs, wrong completion length, or constant rewards)."""


class DegenerateRolloutGuard:
    """Stops a run on degenerate rollouts (R7; MiniOneRec issue 58).

    ``check`` raises :class:`DegenerateRolloutError` when a completion's length differs from the
    expected one (SID length + suffix), when invalid SIDs exceed ``max_invalid``, or when every reward
    of the step was equal (std 0) for ``equal_reward_steps`` consecutive steps (0 disables that check).
    """

    def __init__(self, expected_len: int, equal_reward_steps: int = 20, max_invalid: int = 0):
        self.expected_len = int(expected_len)
        self.equal_reward_steps = int(equal_reward_steps)
        self.max_invalid = int(max_invalid)
        self.equal_steps = 0  # consecutive steps with all rewards equal (saved with checkpoints)

    def check(self, step: int, stats: Mapping[str, float]) -> None:
        if stats["completion_len_min"] != self.expected_len or stats["completion_len_max"] != self.expected_len:
            raise DegenerateRolloutError(
                f"step {step}: completion lengths {stats['completion_len_min']:.0f}..{stats['completion_len_max']:.0f}, "
                f"expected {self.expected_len} (SID tokens + newline + EOS)")
        if stats["invalid_sids"] > self.max_invalid:
            raise DegenerateRolloutError(f"step {step}: {stats['invalid_sids']:.0f} invalid SIDs in the rollouts "
                                         f"(allowed {self.max_invalid})")
        self.equal_steps = self.equal_steps + 1 if stats["reward_std"] == 0.0 else 0
        if self.equal_reward_steps > 0 and self.equal_steps >= self.equal_reward_steps:
            raise DegenerateRolloutError(f"step {step}: all rewards equal for {self.equal_steps} consecutive steps "
                                         f"(reward {stats['reward_mean']:.4f}); the policy gets no signal")
