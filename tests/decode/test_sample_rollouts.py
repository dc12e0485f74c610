"""Constrained sampling rollouts (tsrec.decode.rollout.sample_rollouts, ``rl.rollout=sample``).

The sampler must draw from the policy restricted to the catalogue: at each SID level a code from
softmax(full-vocabulary log-prob / T) over the allowed codes of the prefix. The reference here computes
that distribution for every catalogue SID with one plain forward per prefix (no cache, no batching).
"""

from __future__ import annotations


import pytest
import torch

from tsrec import prompts
from tsrec.decode.beam import left_pad
from tsrec.decode.constraints import SidConstraints
from tsrec.decode.rollout import sample_rollouts


def _prompt(tok, index, history):
    return prompts.encode_prompt(tok, prompts.next_sid(history, stage="eval"))


@torch.no_grad()
def reference_sid_probs(model, prompt: list[int], cons: SidConstraints, temperature: float) -> torch.Tensor:
    """Sampling probability of every catalogue SID (row order of ``cons.sids``), level by level."""
    probs = torch.ones(cons.num_sids, dtype=torch.float64)
    for s, sid_ids in enumerate(cons.sid_token_ids.tolist()):
        prefix = list(prompt)
        node = torch.zeros(1, dtype=torch.long)
        for level, tok_id in enumerate(sid_ids):
            logits = model(input_ids=torch.tensor([prefix])).logits[0, -1].double()
            lp = torch.log_softmax(logits, -1)[cons.level_token_ids[level]]
            child = cons.lookup(level, node)[0]
            allowed = child >= 0
            dist = torch.softmax((lp / temperature).masked_fill(~allowed, float("-inf")), -1)
            code = cons.level_token_ids[level].tolist().index(tok_id)
            probs[s] *= dist[code]
            node = child[code : code + 1]
            prefix.append(tok_id)
    return probs


def test_draws_follow_the_constrained_distribution(sid_model, sid_index, make_catalogue):
    """4,000 draws for one prompt: every SID's frequency within 4 standard errors of its exact probability (T = 2)."""
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(3), tok)
    s = sid_index.sids()
    prompt = _prompt(tok, sid_index, [s[0], s[5]])
    ids, mask = left_pad([prompt], tok.eos_token_id)
    n = 4000
    gen = torch.Generator().manual_seed(0)
    ro = sample_rollouts(model, ids, mask, cons, n, temperature=2.0, generator=gen)
    counts = torch.bincount(ro.sid_index, minlength=cons.num_sids).double()
    p = reference_sid_probs(model, prompt, cons, temperature=2.0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert (p > 0.02).sum() >= 4  # the test has power: several SIDs are likely
    se = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 4 * se + 1e-3).all(), (counts / n, p)


def test_rollout_rows_are_catalogue_sids_scored_and_sorted(sid_model, sid_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(sid_index, tok)
    s = sid_index.sids()
    raw = [_prompt(tok, sid_index, h) for h in ([s[0]], [s[5], s[0], s[42]], [])]
    ids, mask = left_pad(raw, tok.eos_token_id)
    suffix = [*tok("\n", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    B, T, G, S = 3, ids.shape[1], 6, len(suffix)
    ro = sample_rollouts(model, ids, mask, cons, G, generator=torch.Generator().manual_seed(1), suffix_ids=suffix)
    assert ro.sequences.shape == (B * G, T + 3 + S) and ro.completion_ids.shape == (B * G, 3 + S)
    assert torch.equal(ro.completion_ids[:, :3], cons.sid_token_ids[ro.sid_index])  # every row a catalogue SID
    assert ro.completion_ids[:, 3:].tolist() == [suffix] * (B * G)
    assert torch.equal(ro.sequences[:, :T], ids.repeat_interleave(G, 0))
    assert ro.beam_ranks.tolist() == list(range(G)) * B and ro.prompt_index.tolist() == sum(([b] * G for b in range(B)), [])
    torch.testing.assert_close(ro.scores, ro.token_logprobs[:, :3].sum(-1))
    assert all((ro.scores.view(B, G)[b].diff() <= 0).all() for b in range(B))  # rank 0 = most likely draw
    # Each row's token log-probs are the full-vocabulary log-probs of a plain forward over its sequence.
    with torch.no_grad():
        logits = model(input_ids=ro.sequences, attention_mask=ro.attention_mask,
                       position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    lp = torch.log_softmax(logits.float(), -1)[:, T - 1 : T + 2].gather(-1, ro.completion_ids[:, :3, None]).squeeze(-1)
    torch.testing.assert_close(ro.token_logprobs[:, :3], lp, atol=1e-4, rtol=0)


def test_seeded_generator_repeats_and_temperature_sharpens(sid_model, sid_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(sid_index, tok)
    s = sid_index.sids()
    ids, mask = left_pad([_prompt(tok, sid_index, [s[3]])], tok.eos_token_id)

    def draw(seed, temperature=1.0, g=64):
        return sample_rollouts(model, ids, mask, cons, g, temperature, torch.Generator().manual_seed(seed)).sid_index

    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))
    # Near-zero temperature: every draw is the per-level argmax path, the first beam of a width-1 search.
    from tsrec.decode.beam import constrained_beam_search

    greedy = constrained_beam_search(model, ids, mask, cons, 1).sid_index[0, 0].item()
    cold = draw(3, temperature=1e-3)
    assert cold.unique().tolist() == [greedy]
    assert draw(3, temperature=5.0).unique().numel() > 10  # hot: spread over the catalogue


def test_bad_temperature_is_an_error(sid_model, sid_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(sid_index, tok)
    ids, mask = left_pad([[1, 2, 3]], tok.eos_token_id)
    with pytest.raises(ValueError, match="temperature"):
        sample_rollouts(model, ids, mask, cons, 4, temperature=0.0)
