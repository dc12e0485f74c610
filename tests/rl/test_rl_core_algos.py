"""GRPO numerics (tsrec/rl/core_algos.py) against METHOD.md 1.7 and direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from tsrec.rl import core_algos as ca

# METHOD.md 1.7, the G = 16 rank-penalty table (4 decimals).
METHOD_G16 = [-.1638, -.1033, -.0819, -.0705, -.0634, -.0583, -.0546, -.0517,
              -.0493, -.0473, -.0457, -.0443, -.0430, -.0419, -.0409, -.0401]


def test_rank_penalties_g16_equal_method_table():
    p = ca.rank_penalties(16)
    assert [round(float(x), 4) for x in p] == METHOD_G16
    denom = sum(1 / math.log2(j + 2) for j in range(16))
    assert round(denom, 4) == 6.1060
    assert float(p[0]) == pytest.approx(-1 / denom, abs=1e-12)


def test_ranking_rewards_hand_example():
    # Group 0 hits at rank 2; group 1 has no hit; group 2 hits at rank 0 with ranks given explicitly out of order.
    hits = torch.tensor([[False, False, True, False], [False] * 4, [False, True, False, False]])
    ranks = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [3, 0, 1, 2]])
    d = [1 / math.log2(i + 2) for i in range(4)]
    pen = [-x / sum(d) for x in d]
    r = ca.ranking_rewards(hits, ranks)
    expect = [[pen[0], pen[1], 1.0, pen[3]], [0.0] * 4, [pen[3], 1.0, pen[1], pen[2]]]
    assert torch.allclose(r.total, torch.tensor(expect), atol=1e-7)
    assert torch.equal(r.rule, hits.float())
    # Weights multiply the parts.
    r2 = ca.ranking_rewards(hits, ranks, rule_weight=2.0, rank_weight=0.5)
    assert torch.allclose(r2.total, 2.0 * r.rule + 0.5 * r.rank)


def test_sid_hits_use_each_samples_own_target():
    # Two samples with the same completions but different targets (R8): each is scored against its own.
    comp = torch.tensor([[[1, 2, 3], [1, 2, 4]], [[1, 2, 3], [1, 2, 4]]])
    targets = torch.tensor([[1, 2, 4], [1, 2, 3]])
    assert ca.sid_hits(comp, targets).tolist() == [[False, True], [True, False]]
    with pytest.raises(ValueError, match="do not match"):
        ca.sid_hits(comp, targets[:1])


def test_group_advantages_hand_example():
    R = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    A = ca.group_advantages(R)
    # mean .25, unbiased std sqrt((.75^2 + 3 * .25^2) / 3) = .5
    assert torch.allclose(A[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4))
    assert torch.equal(A[1], torch.zeros(4))
    with pytest.raises(ValueError, match="group size 1"):
        ca.group_advantages(torch.ones(3, 1))


def test_k3_kl_zero_at_reference_and_formula():
    # Seeded: with the global RNG, whatever ran before decides the draws, and a log-prob difference of
    # ~1e-4 gives exp(d) - d - 1 = 0 in float32 (the strict > 0 below then fails by chance).
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(5, 7, generator=gen), -1)
    assert torch.equal(ca.k3_kl(lp, lp), torch.zeros_like(lp))
    ref = torch.log_softmax(torch.randn(5, 7, generator=gen), -1)
    d = ref - lp
    assert torch.allclose(ca.k3_kl(lp, ref), d.exp() - d - 1)
    assert bool((ca.k3_kl(lp, ref) >= 0).all()) and bool((ca.k3_kl(lp, ref)[d.abs() > 1e-2] > 0).all())


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 9, 9, 7], [5, 9, 6, 6, 6], [5, 6, 7, 8, 8]])
    m = ca.completion_mask(ids, eos_id=9)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def _direct_loss(lp, adv, mask, ref, beta, old=None, clip=None):
    """The METHOD.md 1.7 loss, element by element in Python floats."""
    total = 0.0
    for n in range(len(lp)):
        s, cnt = 0.0, 0
        for t in range(len(lp[n])):
            if not mask[n][t]:
                continue
            a = adv[n] if not isinstance(adv[n], list) else adv[n][t]
            ratio = math.exp(lp[n][t] - (old[n][t] if old else lp[n][t]))
            pg = ratio * a
            if clip is not None:
                pg = min(pg, min(max(ratio, 1 - clip), 1 + clip) * a)
            d = ref[n][t] - lp[n][t]
            s += -(pg - beta * (math.exp(d) - d - 1))
            cnt += 1
        total += s / cnt
    return total / len(lp)


def test_policy_loss_hand_example():
    lp = [[-0.5, -1.0, -2.0], [-0.1, -0.3, -4.0]]
    ref = [[-0.7, -0.9, -1.0], [-0.2, -0.3, -0.5]]
    adv = [1.5, -0.5]
    mask = [[1, 1, 1], [1, 1, 0]]
    loss, stats = ca.policy_loss(torch.tensor(lp), torch.tensor(adv), torch.tensor(mask),
                                 ref_logprobs=torch.tensor(ref), beta=0.04)
    assert float(loss) == pytest.approx(_direct_loss(lp, adv, mask, ref, 0.04), abs=1e-6)
    assert stats.tokens == 5 and stats.ratio == pytest.approx(1.0)
    # Per-token advantages and the clipped ratio against older log-probs.
    adv_t = [[1.0, 0.2, -0.3], [-1.0, 0.5, 2.0]]
    old = [[-0.9, -1.0, -1.5], [-0.1, -0.6, -4.0]]
    loss, stats = ca.policy_loss(torch.tensor(lp), torch.tensor(adv_t), torch.tensor(mask), old_logprobs=torch.tensor(old),
                                 ref_logprobs=torch.tensor(ref), beta=0.04, clip_eps=0.2)
    assert float(loss) == pytest.approx(_direct_loss(lp, adv_t, mask, ref, 0.04, old=old, clip=0.2), abs=1e-6)
    assert 0 < stats.clip_fraction < 1
    with pytest.raises(ValueError, match="reference"):
        ca.policy_loss(torch.tensor(lp), torch.tensor(adv), torch.tensor(mask), beta=0.1)
    with pytest.raises(ValueError, match="empty mask"):
        ca.policy_loss(torch.tensor(lp), torch.tensor(adv), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_loss_gradient_on_tiny_model_equals_autograd_of_written_out_formula():
    from tsrec.tiny import build_tiny_model

    V, C, beta = 97, 4, 0.1
    policy = build_tiny_model(V, hidden_size=32, layers=2, seed=1).float()
    reference = build_tiny_model(V, hidden_size=32, layers=2, seed=2).float().eval()
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, V, (4, 11), generator=g)
    attn = torch.ones_like(seqs)
    attn[1, :3] = 0  # left padding
    attn[3, :1] = 0
    seqs[attn == 0] = 0
    comp = seqs[:, -C:].clone()
    mask = torch.ones(4, C)
    mask[2, 3] = 0.0  # a token after EOS does not count
    adv = torch.tensor([[0.7, 0.7, 0.7, 0.7], [-1.2, 0.3, 0.0, 0.0], [0.4, -0.4, 1.0, 2.0], [0.0, 0.9, -0.1, 0.0]])

    # Under test: logits only at completion positions, then the loss.
    with torch.no_grad():
        ref_lp = ca.sequence_logprobs(reference, seqs, attn, C)
    lp = ca.sequence_logprobs(policy, seqs, attn, C)
    loss, _ = ca.policy_loss(lp, adv, mask, ref_logprobs=ref_lp, beta=beta)
    grads = torch.autograd.grad(loss, [p for p in policy.parameters()])

    # Independent: full-sequence logits from the model's own forward (one pass each), the formula token by token.
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    S = seqs.shape[1]
    policy_logits = policy(input_ids=seqs, attention_mask=attn, position_ids=pos).logits  # (N, S, V)
    with torch.no_grad():
        ref_logits = reference(input_ids=seqs, attention_mask=attn, position_ids=pos).logits

    def full_lp(logits, n, t):
        return torch.log_softmax(logits[n, S - C - 1 + t].double(), -1)[comp[n, t]]

    ref_direct = [[float(full_lp(ref_logits, n, t)) for t in range(C)] for n in range(4)]
    assert torch.allclose(ref_lp.double(), torch.tensor(ref_direct, dtype=torch.float64), atol=1e-5)
    total = 0.0
    for n in range(4):
        s, cnt = 0.0, 0
        for t in range(C):
            if mask[n, t] == 0:
                continue
            lpt = full_lp(policy_logits, n, t)
            d = ref_direct[n][t] - lpt
            s = s - (torch.exp(lpt - lpt.detach()) * float(adv[n, t]) - beta * (torch.exp(d) - d - 1))
            cnt += 1
        total = total + s / cnt
    direct = total / 4
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), abs=1e-5)
    direct_grads = torch.autograd.grad(direct, [p for p in policy.parameters()], allow_unused=True)
    for p, a, b in zip(policy.named_parameters(), grads, direct_grads):
        b = torch.zeros_like(a) if b is None else b.to(a.dtype)
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), p[0]
    assert any(float(a.abs().max()) > 0 for a in grads)


def test_grouped_logprobs_equal_the_plain_forward_with_their_gradients():
    """Each prompt once + a repeated KV cache (grouped_sequence_logprobs) against every row through the
    decoder (sequence_logprobs): same log-probs, same parameter gradients, with prompts of different lengths."""
    from tsrec.tiny import build_tiny_model

    V, B, G, P, C = 97, 3, 4, 9, 5
    lm = build_tiny_model(V, hidden_size=32, layers=2, seed=3).float()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, V, (B, P), generator=g)
    pmask = torch.ones(B, P, dtype=torch.long)
    pmask[0, :4] = 0  # left padding of different lengths
    pmask[2, :1] = 0
    prompts[pmask == 0] = 0
    comp = torch.randint(1, V, (B * G, C), generator=g)
    seqs = torch.cat([prompts.repeat_interleave(G, 0), comp], 1)
    attn = torch.cat([pmask.repeat_interleave(G, 0), torch.ones(B * G, C, dtype=torch.long)], 1)
    weights = torch.randn(B * G, C, generator=g)

    plain = ca.sequence_logprobs(lm, seqs, attn, C)
    plain_grads = torch.autograd.grad((plain * weights).sum(), list(lm.parameters()))
    grouped = ca.grouped_sequence_logprobs(lm, seqs, attn, C, G)
    grouped_grads = torch.autograd.grad((grouped * weights).sum(), list(lm.parameters()))

    assert grouped.shape == (B * G, C)
    assert torch.allclose(grouped, plain, atol=1e-5), (grouped - plain).abs().max()
    for (name, _), a, b in zip(lm.named_parameters(), plain_grads, grouped_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert max(float(a.abs().max()) for a in plain_grads) > 0
    with pytest.raises(ValueError, match="groups"):
        ca.grouped_sequence_logprobs(lm, seqs, attn, C, 3)  # 12 rows are not groups of 3 identical prompts
    group_minor = lambda t: t.view(B, G, -1).transpose(0, 1).reshape(B * G, -1)  # noqa: E731 - row g * B + b
    with pytest.raises(ValueError, match="prompt-major"):
        ca.grouped_sequence_logprobs(lm, group_minor(seqs), group_minor(attn), C, G)


RECORDS = [
    {"token": "<a_0>", "description": "d", "keywords": ["glue", "tape", "adhesive"]},
    {"token": "<a_1>", "description": "d", "keywords": ["Tape", "adhesive", "film", "seal"]},
    {"token": "<a_2>", "description": "d", "keywords": ["drill", "bit"]},
    {"token": "<b_0>", "description": "d", "keywords": ["small"]},
    {"token": "<b_1>", "description": "d", "keywords": ["small", "large"]},
]


def test_keyword_jaccard_similarity_table():
    sim = ca.build_token_similarity(RECORDS, num_codes=[3, 3])
    a = sim.matrices[0]
    assert float(a[0, 1]) == pytest.approx(2 / 5)  # {tape, adhesive} of {glue, tape, adhesive, film, seal}
    assert float(a[0, 2]) == 0.0 and float(a[1, 0]) == float(a[0, 1])
    assert torch.equal(torch.diagonal(a), torch.ones(3))
    b = sim.matrices[1]
    assert float(b[0, 1]) == pytest.approx(0.5) and float(b[2, 2]) == 1.0 and float(b[0, 2]) == 0.0  # <b_2>: no record
    with pytest.raises(ValueError, match="outside the codebooks"):
        ca.build_token_similarity(RECORDS, num_codes=[2, 3])
    with pytest.raises(ValueError, match="embed_fn"):
        ca.build_token_similarity(RECORDS, num_codes=[3, 3], method="embedding")


def test_embedding_similarity_is_clamped_cosine_with_injected_encoder():
    vecs = {"x": [1.0, 0.0], "y": [1.0, 1.0], "z": [-1.0, 0.0]}
    recs = [{"token": f"<a_{i}>", "description": t, "keywords": ["k"]} for i, t in enumerate("xyz")]
    sim = ca.build_token_similarity(recs, num_codes=[3], method="embedding",
                                    embed_fn=lambda texts: torch.tensor([vecs[t] for t in texts]))
    m = sim.matrices[0]
    assert float(m[0, 1]) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert float(m[0, 2]) == 0.0  # cosine -1: no credit, not a penalty
    assert torch.allclose(torch.diagonal(m), torch.ones(3))


def test_semantic_token_rewards_and_advantages_hand_example():
    sim = ca.build_token_similarity(RECORDS, num_codes=[3, 3])
    # One prompt, target <a_0><b_1>; G = 3 completions: <a_0><b_0>, <a_1><b_1>, <a_2><b_1>.
    comp = torch.tensor([[[0, 0], [1, 1], [2, 1]]])
    target = torch.tensor([[0, 1]])
    s = ca.semantic_token_rewards(sim, comp, target)
    assert s.tolist() == [[[1.0, 0.5], [pytest.approx(0.4), 1.0], [0.0, 1.0]]]
    A = ca.semantic_advantages(s)
    floor = 1 / math.sqrt(3)  # both levels' spreads are below that of one exact match in a group of 3
    lvl0 = torch.tensor([1.0, 0.4, 0.0])
    expect0 = (lvl0 - lvl0.mean()) / (max(float(lvl0.std(unbiased=True)), floor) + 1e-4)
    lvl1 = torch.tensor([0.5, 1.0, 1.0])
    expect1 = (lvl1 - lvl1.mean()) / (max(float(lvl1.std(unbiased=True)), floor) + 1e-4)
    assert torch.allclose(A[0, :, 0], expect0, atol=1e-6) and torch.allclose(A[0, :, 1], expect1, atol=1e-6)
    # The right first level is rewarded though the last level is wrong (completion 0 misses the target).
    assert float(A[0, 0, 0]) > 0
    # Per-token advantages for the loss: SID tokens, then 0 on "\n" and EOS.
    per_tok = ca.combine_advantages("semantic", None, A, completion_len=4)
    assert per_tok.shape == (3, 4) and torch.equal(per_tok[:, 2:], torch.zeros(3, 2))
    seq = torch.tensor([[0.5, -0.2, -0.3]])
    both = ca.combine_advantages("ranking+semantic", seq, A, completion_len=4, semantic_weight=0.5)
    assert torch.allclose(both, seq.reshape(3, 1) + 0.5 * per_tok)
    rank_only = ca.combine_advantages("ranking", seq, None, completion_len=4)
    assert torch.equal(rank_only, seq.reshape(3, 1).expand(3, 4))
    with pytest.raises(ValueError, match="outside the similarity table"):
        ca.semantic_token_rewards(sim, torch.tensor([[[5, 0]]]), target)


def test_sid_code_lookup_maps_token_ids_to_codes():
    lut = ca.sid_code_lookup({"<a_3>": 4, "<b_0>": 5, "x": 1}, vocab_size=7)
    assert lut.tolist() == [-1, -1, -1, -1, 3, 0, -1]


def test_mix_into_reference():
    ref, pol = [torch.ones(3)], [torch.full((3,), 3.0)]
    ca.mix_into_reference_(ref, pol, alpha=0.6)
    assert torch.allclose(ref[0], torch.full((3,), 0.4 * 1 + 0.6 * 3))


def _stats(reward_std=0.0, lengths=(5, 5), invalid=0.0):
    return {"reward_mean": 0.0, "reward_std": reward_std, "completion_len_min": float(min(lengths)),
            "completion_len_max": float(max(lengths)), "invalid_sids": invalid}


def test_degenerate_rollout_guard():
    guard = ca.DegenerateRolloutGuard(expected_len=5, equal_reward_steps=3)
    flat = _stats()
    guard.check(1, flat)
    guard.check(2, flat)
    with pytest.raises(ca.DegenerateRolloutError, match="all rewards equal for 3"):
        guard.check(3, flat)
    guard = ca.DegenerateRolloutGuard(expected_len=5, equal_reward_steps=2)
    guard.check(1, flat)
    guard.check(2, _stats(reward_std=0.3))  # a step with spread resets the count
    guard.check(3, flat)
    with pytest.raises(ca.DegenerateRolloutError, match="completion lengths 1"):
        ca.DegenerateRolloutGuard(5).check(1, _stats(lengths=(1, 5)))
    with pytest.raises(ca.DegenerateRolloutError, match="invalid SIDs"):
        ca.DegenerateRolloutGuard(5).check(1, _stats(invalid=2.0))


def test_semantic_advantage_of_one_small_similarity_among_zeros_stays_small():
    """Issue 22: one completion with similarity 0.02 and fifteen with 0. The plain GRPO normalisation
    (std + 1e-4) gives it 3.68, an exact hit's scale; with the std floored at 1/sqrt(G) it gets
    0.01875 / 0.25 = 0.075, while one exact token (similarity 1) among zeros keeps the GRPO value 3.75."""
    small = torch.zeros(1, 16, 1)
    small[0, 0, 0] = 0.02
    plain = ca.group_advantages(small)
    assert float(plain[0, 0, 0]) == pytest.approx(3.68, abs=0.01)  # the problem
    A = ca.semantic_advantages(small)
    assert float(A[0, 0, 0]) == pytest.approx(0.01875 / (0.25 + 1e-4), rel=1e-5)
    assert float(A[0, 1, 0]) == pytest.approx(-0.00125 / (0.25 + 1e-4), rel=1e-5)
    exact = torch.zeros(1, 16, 1)
    exact[0, 0, 0] = 1.0
    assert float(ca.semantic_advantages(exact)[0, 0, 0]) == pytest.approx(float(ca.group_advantages(exact)[0, 0, 0]))
    assert float(ca.semantic_advantages(exact)[0, 0, 0]) == pytest.approx(3.75, abs=2e-3)
    # Informative groups (spread above one exact match's) are normalised as GRPO does; constant ones get 0.
    spread = torch.tensor([1.0, 1.0, 0.0, 0.5] * 4).reshape(1, 16, 1)
    assert torch.allclose(ca.semantic_advantages(spread), ca.group_advantages(spread))
    assert torch.equal(ca.semantic_advantages(torch.full((1, 16, 2), 0.3)), torch.zeros(1, 16, 2))
