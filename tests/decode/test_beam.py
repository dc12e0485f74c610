"""Constrained beam search: exactness vs exhaustive scoring, parity with transformers' beam search,
hard errors on empty allowed sets, determinism, 4-level SIDs, rollout shapes."""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch

from tsrec import prompts
from tsrec.artifacts import InputError
from tsrec.decode.beam import (
    EmptyAllowedSetError,
    PaddingSideError,
    constrained_beam_search,
    left_pad,
    unwrap_model,
)
from tsrec.decode.constraints import SidConstraints
from tsrec.decode.reference import exhaustive_scores, hf_prefix_beam_search
from tsrec.decode.rollout import generate_rollouts
from tsrec.sid.index import SidIndex, split_sid


def _prompt_batch(tok, histories):
    ids = [prompts.encode_prompt(tok, prompts.next_sid(h, stage="eval")) for h in histories]
    return ids, *left_pad(ids, tok.eos_token_id)


def histories(index):
    """Three histories over catalogue SIDs: one item, three items (one repeated), empty."""
    s = index.sids()
    return [[s[0]], [s[5], s[0], s[42]], []]


def assert_matches_exhaustive(model, prompt, cons, out, b):
    """Row ``b`` of ``out`` ranks every catalogue SID exactly as exhaustive scoring does."""
    truth = exhaustive_scores(model, prompt, cons)
    order = torch.argsort(truth, descending=True, stable=True)
    assert out.sid_index[b].tolist() == order.tolist()
    torch.testing.assert_close(out.scores[b], truth[order], atol=1e-4, rtol=0)


@pytest.mark.parametrize("levels", [3, 4])
def test_top_k_equals_exhaustive_scoring(sid_model, sid_index, make_catalogue, levels):
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(levels), tok)
    assert cons.num_levels == levels and cons.num_sids == (12 if levels == 3 else 13)  # <d_r> splits the collision
    assert max(t.shape[0] for t in cons.children) <= cons.num_sids  # the beam holds every prefix
    raw, ids, mask = _prompt_batch(tok, histories(sid_index))
    out = constrained_beam_search(model, ids, mask, cons, cons.num_sids)
    for b, prompt in enumerate(raw):
        assert_matches_exhaustive(model, prompt, cons, out, b)
        # score = sum of the per-level token log-probs; every returned SID is distinct and valid
        torch.testing.assert_close(out.token_logprobs[b].sum(-1), out.scores[b])
        assert len(set(out.sid_index[b].tolist())) == cons.num_sids
        assert torch.equal(out.sid_token_ids[b], cons.sid_token_ids[out.sid_index[b]])


@pytest.mark.parametrize("catalogue", ["generated", "industrial"])
def test_parity_with_transformers_prefix_allowed_tokens_fn(request, catalogue):
    if catalogue == "generated":
        index, (model, tok), size = request.getfixturevalue("sid_index"), request.getfixturevalue("sid_model"), 600
    else:  # the full Industrial catalogue (shared data only)
        index, (model, tok), size = (request.getfixturevalue("industrial_index"),
                                     request.getfixturevalue("industrial_model"), 3670)
    cons = SidConstraints.from_index(index, tok)
    assert (cons.num_sids, cons.num_levels) == (size, 3)
    _, ids, mask = _prompt_batch(tok, histories(index))
    ours = constrained_beam_search(model, ids, mask, cons, 20)
    hf_sids, hf_scores = hf_prefix_beam_search(model, ids, mask, cons, 20, tok.eos_token_id)
    assert ours.sid_strings(cons) == hf_sids
    torch.testing.assert_close(ours.scores, hf_scores, atol=1e-4, rtol=0)


def test_deterministic_and_batch_composition(sid_model, sid_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(sid_index, tok)
    raw, ids, mask = _prompt_batch(tok, histories(sid_index))
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


def test_empty_allowed_set_is_an_error(sid_model, sid_index, make_catalogue):
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(), tok)
    _, ids, mask = _prompt_batch(tok, histories(sid_index)[:1])
    broken = SidConstraints(**{**cons.__dict__, "children": [t.clone() for t in cons.children]})
    broken.children[1][:] = -1  # every level-1 node loses its children
    with pytest.raises(EmptyAllowedSetError, match="empty allowed set at SID level 1"):
        constrained_beam_search(model, ids, mask, broken, 3)
    counted = constrained_beam_search(model, ids, mask, broken, 3, on_empty="count")
    assert int(counted.empty_events.sum()) == 3 and (counted.sid_index == -1).all()
    assert torch.isinf(counted.scores).all()


def test_width_and_tokenizer_checks(sid_model, sid_index, make_catalogue):
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(), tok)
    _, ids, mask = _prompt_batch(tok, histories(sid_index)[:1])
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


def test_rollout_shapes(sid_model, sid_index):
    model, tok = sid_model
    cons = SidConstraints.from_index(sid_index, tok)
    _, ids, mask = _prompt_batch(tok, histories(sid_index)[:2])
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


def test_right_padded_input_is_an_error(sid_model, sid_index, make_catalogue):
    """A right-padded batch would continue from a pad token: a named error, not wrong lists."""
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(), tok)
    raw, ids, mask = _prompt_batch(tok, histories(sid_index)[:2])
    assert mask[0, 0] == 0  # prompt 0 is shorter, so it is padded
    T = ids.shape[1]
    right_ids, right_mask = torch.full_like(ids, tok.eos_token_id), torch.zeros_like(mask)
    for b, p in enumerate(raw):
        right_ids[b, : len(p)], right_mask[b, : len(p)] = torch.tensor(p), 1
    with pytest.raises(PaddingSideError, match="prompt 0 is not left-padded"):
        constrained_beam_search(model, right_ids, right_mask, cons, 3)
    holed = mask.clone()
    holed[1, T // 2] = 0  # a hole inside a prompt is not left padding either
    with pytest.raises(PaddingSideError, match="prompt 1"):
        constrained_beam_search(model, ids, holed, cons, 3)
    constrained_beam_search(model, ids, mask, cons, 3)  # the left-padded batch is accepted


def test_peft_wrapped_model_gets_the_current_cache_keyword(sid_model, sid_index):
    """RL rollouts call the policy through peft/DeepSpeed wrappers whose forward hides the HF signature."""
    from peft import LoraConfig, get_peft_model

    model, tok = sid_model
    cons = SidConstraints.from_index(sid_index, tok)
    _, ids, mask = _prompt_batch(tok, histories(sid_index)[:2])
    base = constrained_beam_search(model, ids, mask, cons, 8)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert unwrap_model(wrapped) is wrapped.base_model.model
    seen: list[set[str]] = []
    hook = unwrap_model(wrapped).register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    try:
        out = constrained_beam_search(wrapped, ids, mask, cons, 8)
    finally:
        hook.remove()
    # The HF module received the keyword its own forward declares, never the deprecated one.
    assert "cache" in inspect.signature(type(model).forward).parameters
    assert len(seen) == 3 and all("past_key_values" not in kw for kw in seen) and all("cache" in kw for kw in seen[1:])
    # LoRA B starts at zero: the wrapped model is the same function, so the lists are identical.
    assert torch.equal(out.sid_index, base.sid_index)
    torch.testing.assert_close(out.scores, base.scores)


def _suffix(tok):
    return [*tok("\n", add_special_tokens=False)["input_ids"], tok.eos_token_id]


def test_upstream_suffix_scoring_equals_exhaustive_and_transformers(sid_model, sid_index, make_catalogue):
    """Upstream parity (METHOD.md 1.8): "\\n" and EOS after the SID are scored and re-rank the list."""
    model, tok = sid_model
    suffix = _suffix(tok)
    small = SidConstraints.from_index(make_catalogue(), tok)
    raw, ids, mask = _prompt_batch(tok, histories(sid_index))
    out = constrained_beam_search(model, ids, mask, small, small.num_sids, score_suffix_ids=suffix)
    plain = constrained_beam_search(model, ids, mask, small, small.num_sids)
    assert out.suffix_logprobs.shape == (3, small.num_sids, len(suffix)) and plain.suffix_logprobs is None
    for b, prompt in enumerate(raw):
        truth = exhaustive_scores(model, prompt, small, suffix_ids=suffix)
        order = torch.argsort(truth, descending=True, stable=True)
        assert out.sid_index[b].tolist() == order.tolist()
        torch.testing.assert_close(out.scores[b], truth[order], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.token_logprobs[b].sum(-1) + out.suffix_logprobs[b].sum(-1), out.scores[b])
    # The suffix terms matter: with them the ranking differs from the SID-only ranking here.
    assert not torch.equal(out.sid_index, plain.sid_index)
    # Same as transformers' beam search over the upstream trie (SID, then "\n", then EOS) on 600 SIDs.
    cons = SidConstraints.from_index(sid_index, tok)
    ours = constrained_beam_search(model, ids, mask, cons, 20, score_suffix_ids=suffix)
    hf_sids, hf_scores = hf_prefix_beam_search(model, ids, mask, cons, 20, tok.eos_token_id, suffix_ids=suffix)
    assert ours.sid_strings(cons) == hf_sids
    torch.testing.assert_close(ours.scores, hf_scores, atol=1e-4, rtol=0)


def test_leaf_check_catches_a_corrupt_leaf_numbering(sid_model, make_catalogue):
    """Swapped leaf ids decode the right tokens but point at other SIDs: leaf_matches must see it."""
    model, tok = sid_model
    cons = SidConstraints.from_index(make_catalogue(), tok)
    _, ids, mask = _prompt_batch(tok, [[]])
    good = constrained_beam_search(model, ids, mask, cons, cons.num_sids)
    assert cons.leaf_matches(good.sid_token_ids, good.sid_index).all()
    broken = SidConstraints(**{**cons.__dict__, "children": [t.clone() for t in cons.children]})
    last = broken.children[-1]
    a, b = (last == 0).nonzero()[0], (last == 1).nonzero()[0]
    last[tuple(a)], last[tuple(b)] = 1, 0  # leaves 0 and 1 swapped
    bad = constrained_beam_search(model, ids, mask, broken, cons.num_sids)
    ok = broken.leaf_matches(bad.sid_token_ids, bad.sid_index)
    assert int((~ok).sum()) == 2
    assert sorted(bad.sid_index[~ok].tolist()) == [0, 1]


def test_deepspeed_engine_gets_the_current_cache_keyword(sid_model, sid_index, monkeypatch):
    """The RL trainer holds the policy as a DeepSpeed engine (its forward is ``forward(*inputs, **kwargs)``)."""
    import socket

    import deepspeed
    import torch.distributed as dist

    model, tok = sid_model
    if not dist.is_initialized():  # a 1-rank gloo group, as the SFT loop makes outside torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                     "WORLD_SIZE": "1"}.items():
            monkeypatch.setenv(k, v)
    if not torch.cuda.is_available():  # skip DeepSpeed's ~35 s shm-op JIT build on CPU (STACK.md 2)
        monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=copy.deepcopy(model), config={
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}})
    assert "cache" not in inspect.signature(engine.forward).parameters and unwrap_model(engine) is engine.module
    cons = SidConstraints.from_index(sid_index, tok)
    _, ids, mask = _prompt_batch(tok, histories(sid_index)[:2])
    seen: list[set[str]] = []
    hook = engine.module.register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    try:
        out = constrained_beam_search(engine, ids, mask, cons, 8)
    finally:
        hook.remove()
    assert len(seen) == 3 and all("past_key_values" not in kw for kw in seen) and all("cache" in kw for kw in seen[1:])
    base = constrained_beam_search(model, ids, mask, cons, 8)
    assert torch.equal(out.sid_index, base.sid_index)
