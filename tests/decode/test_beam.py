"""Constrained beam search: exactness vs exhaustive scoring, parity with transformers' beam search,
hard errors on empty allowed sets, determinism, 4-level SIDs, rollout shapes."""

from __future__ import annotations

import pytest
import torch

from tsrec import prompts
from tsrec.artifacts import InputError
from tsrec.decode.beam import EmptyAllowedSetError, constrained_beam_search, left_pad
from tsrec.decode.constraints import SidConstraints
from tsrec.decode.reference import exhaustive_scores, hf_prefix_beam_search
from tsrec.decode.rollout import generate_rollouts
from tsrec.sid.index import SidIndex, split_sid


def _prompt_batch(tok, histories):
    ids = [prompts.encode_prompt(tok, prompts.next_sid(h, stage="eval")) for h in histories]
    return ids, *left_pad(ids, tok.eos_token_id)


HISTORIES = [
    ["<a_165><b_107><c_44>"],
    ["<a_104><b_118><c_176>", "<a_165><b_107><c_44>", "<a_42><b_80><c_160>"],
    [],
]


def assert_matches_exhaustive(model, prompt, cons, out, b):
    """Row ``b`` of ``out`` ranks every catalogue SID exactly as exhaustive scoring does."""
    truth = exhaustive_scores(model, prompt, cons)
    order = torch.argsort(truth, descending=True, stable=True)
    assert out.sid_index[b].tolist() == order.tolist()
    torch.testing.assert_close(out.scores[b], truth[order], atol=1e-4, rtol=0)


@pytest.mark.parametrize("levels", [3, 4])
def test_top_k_equals_exhaustive_scoring(sid_model, make_catalogue, levels):
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(levels), tok)
    assert cons.num_levels == levels and cons.num_sids == (12 if levels == 3 else 13)  # <d_r> splits the collision
    assert max(t.shape[0] for t in cons.children) <= cons.num_sids  # the beam holds every prefix
    raw, ids, mask = _prompt_batch(tok, HISTORIES)
    out = constrained_beam_search(model, ids, mask, cons, cons.num_sids)
    for b, prompt in enumerate(raw):
        assert_matches_exhaustive(model, prompt, cons, out, b)
        # score = sum of the per-level token log-probs; every returned SID is distinct and valid
        torch.testing.assert_close(out.token_logprobs[b].sum(-1), out.scores[b])
        assert len(set(out.sid_index[b].tolist())) == cons.num_sids
        assert torch.equal(out.sid_token_ids[b], cons.sid_token_ids[out.sid_index[b]])


def test_parity_with_transformers_prefix_allowed_tokens_fn(sid_model, industrial_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(industrial_index, tok)
    assert (cons.num_sids, cons.num_levels) == (3670, 3)
    _, ids, mask = _prompt_batch(tok, HISTORIES)
    ours = constrained_beam_search(model, ids, mask, cons, 20)
    hf_sids, hf_scores = hf_prefix_beam_search(model, ids, mask, cons, 20, tok.eos_token_id)
    assert ours.sid_strings(cons) == hf_sids
    torch.testing.assert_close(ours.scores, hf_scores, atol=1e-4, rtol=0)


def test_deterministic_and_batch_composition(sid_model, industrial_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(industrial_index, tok)
    raw, ids, mask = _prompt_batch(tok, HISTORIES)
    a = constrained_beam_search(model, ids, mask, cons, 10)
    b = constrained_beam_search(model, ids, mask, cons, 10)
    assert torch.equal(a.sid_index, b.sid_index) and torch.equal(a.scores, b.scores)
    # Left padding and position ids: a prompt decoded alone gives the same SIDs as in the padded batch.
    alone_ids, alone_mask = left_pad([raw[0]], tok.eos_token_id)
    alone = constrained_beam_search(model, alone_ids, alone_mask, cons, 10)
    assert alone.sid_index[0].tolist() == a.sid_index[0].tolist()
    torch.testing.assert_close(alone.scores[0], a.scores[0], atol=1e-4, rtol=0)
    # The model's generation config is never read: sampling settings there change nothing.
    model.generation_config.do_sample, model.generation_config.top_k = True, 3
    try:
        c = constrained_beam_search(model, ids, mask, cons, 10)
    finally:
        model.generation_config.do_sample, model.generation_config.top_k = False, None
    assert torch.equal(a.sid_index, c.sid_index)


def test_empty_allowed_set_is_an_error(sid_model, make_catalogue):
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(), tok)
    _, ids, mask = _prompt_batch(tok, HISTORIES[:1])
    broken = SidConstraints(**{**cons.__dict__, "children": [t.clone() for t in cons.children]})
    broken.children[1][:] = -1  # every level-1 node loses its children
    with pytest.raises(EmptyAllowedSetError, match="empty allowed set at SID level 1"):
        constrained_beam_search(model, ids, mask, broken, 3)
    counted = constrained_beam_search(model, ids, mask, broken, 3, on_empty="count")
    assert int(counted.empty_events.sum()) == 3 and (counted.sid_index == -1).all()
    assert torch.isinf(counted.scores).all()


def test_width_and_tokenizer_checks(sid_model, make_catalogue):
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(), tok)
    _, ids, mask = _prompt_batch(tok, HISTORIES[:1])
    with pytest.raises(ValueError, match="beam width"):
        constrained_beam_search(model, ids, mask, cons, cons.num_sids + 1)
    # K larger than the number of first-level codes: level 0 keeps dead beams, the result is still full.
    out = constrained_beam_search(model, ids, mask, cons, 5)
    assert (out.sid_index >= 0).all() and torch.isfinite(out.scores).all()
    unknown = SidIndex({0: ["<a_999>", "<b_0>", "<c_0>"]})
    with pytest.raises(InputError, match="not a single tokenizer id"):
        SidConstraints.from_index(unknown, tok)
    assert cons.items_of(cons.sids[0]) and sum(len(v) for v in cons.items_by_sid.values()) == 13
    assert split_sid(cons.sids[0])


def test_rollout_shapes(sid_model, industrial_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(industrial_index, tok)
    _, ids, mask = _prompt_batch(tok, HISTORIES[:2])
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    suffix = [*nl, tok.eos_token_id]
    ro = generate_rollouts(model, ids, mask, cons, group_size=4, suffix_ids=suffix)
    B, T, G, S = 2, ids.shape[1], 4, len(suffix)
    assert ro.sequences.shape == (B * G, T + 3 + S) and ro.attention_mask.shape == ro.sequences.shape
    assert ro.completion_ids.shape == (B * G, 3 + S) and ro.token_logprobs.shape == (B * G, 3 + S)
    assert ro.beam_ranks.tolist() == [0, 1, 2, 3] * B and ro.prompt_index.tolist() == [0] * G + [1] * G
    assert torch.isnan(ro.token_logprobs[:, 3:]).all() and torch.isfinite(ro.token_logprobs[:, :3]).all()
    assert ro.completion_ids[:, 3:].tolist() == [suffix] * (B * G)
    assert torch.equal(ro.sequences[:, :T], ids.repeat_interleave(G, 0))
    assert torch.equal(ro.completion_ids[:, :3], cons.sid_token_ids[ro.sid_index])
    assert all((ro.scores.view(B, G)[b].diff() <= 0).all() for b in range(B))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_other_causal_lms_match_exhaustive_scoring(arch):
    """Any HF causal LM: other position schemes (learned absolute in GPT-2) and caches work unchanged."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, eos_token_id=0, bos_token_id=0))
    model.eval()
    items = {i: [f"<a_{i % 3}>", f"<b_{(i // 3) % 3}>", f"<c_{i % 2}>"] for i in range(14)}
    toks = sorted({t for v in items.values() for t in v})
    cons = SidConstraints.from_sid_tokens(items, {t: 250 + i for i, t in enumerate(toks)})
    raw = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(raw, 0)
    out = constrained_beam_search(model, ids, mask, cons, cons.num_sids)
    for b, prompt in enumerate(raw):
        assert_matches_exhaustive(model, prompt, cons, out, b)
