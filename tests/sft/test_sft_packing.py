"""Packing: the packed loss of a batch equals the unpacked per-sample loss; padding share is reported."""

from __future__ import annotations

import torch

from tsrec import prompts
from tsrec.sft.packing import batch_loss, collate, micro_batches, pack_samples, padding_share
from tsrec.sft.tasks import TokenizedSample, tokenize_samples
from tsrec.tiny import build_tiny_model, build_tiny_tokenizer


def _samples(tok):
    sids = ["<a_1><b_2>", "<a_3><b_4>", "<a_5><b_6>"]
    ps = [
        prompts.next_sid(sids[:1], sids[1]),
        prompts.next_sid(sids[:2], sids[2]),
        prompts.sid_to_title(sids[0], "heavy duty staples"),
        prompts.title_to_sid("glue tape", sids[2]),
        prompts.history_to_title(sids, "tape"),
        prompts.token_to_description("<a_1>", "a family of staples"),
    ]
    out = tokenize_samples(tok, ps, cutoff_len=512)
    for i, s in enumerate(out):  # distinct loss weights so the weighting is tested too
        s.loss_weight = 0.5 + 0.25 * i
    return out


def test_packed_loss_equals_unpacked_per_sample_loss():
    tok = build_tiny_tokenizer(["heavy duty staples glue tape"])
    tok.add_tokens(["<a_1>", "<a_3>", "<a_5>", "<b_2>", "<b_4>", "<b_6>"])
    model = build_tiny_model(len(tok), seed=3).eval()
    samples = _samples(tok)
    pack_len = 2 * max(len(s.input_ids) for s in samples)
    rows = pack_samples(samples, pack_len)
    assert len(rows) < len(samples)  # something was actually packed
    assert sorted(id(s) for r in rows for s in r) == sorted(id(s) for s in samples)
    with torch.no_grad():
        packed = batch_loss(model, collate(rows, tok.pad_token_id)).item()
        # Reference: each sample alone, no padding, through the ordinary HF forward with labels.
        num = den = 0.0
        for s in samples:
            ids = torch.tensor([s.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            tgt = torch.tensor(s.labels[1:])
            ce = torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum").item()
            n = int((tgt != -100).sum())
            num += s.loss_weight * ce
            den += s.loss_weight * n
        padded = batch_loss(model, collate([[s] for s in samples], tok.pad_token_id)).item()
    assert abs(packed - num / den) < 1e-5
    assert abs(padded - num / den) < 1e-5


def test_padding_share_and_micro_batches():
    tok = build_tiny_tokenizer()
    samples = [TokenizedSample(list(range(1, n + 1)), [-100] * (n - 2) + [5, 6], "next_sid") for n in (30, 10, 20, 12, 8)]
    packed = micro_batches(samples, num_micro=2, packing=True, pack_len=40, micro_batch_size=4, pad_id=0)
    padded = micro_batches(samples, num_micro=2, packing=False, pack_len=40, micro_batch_size=4, pad_id=0)
    assert len(packed) == len(padded) == 2
    assert sum(b.real_tokens for b in packed) == sum(b.real_tokens for b in padded) == 80
    assert 0.0 <= padding_share(packed) < padding_share(padded) < 1.0
    # An empty share still yields the requested number of (dummy) micro-batches.
    empty = micro_batches([], num_micro=3, packing=True, pack_len=40, micro_batch_size=4, pad_id=0)
    assert len(empty) == 3 and all(b.weight_sum == 0 for b in empty)
    del tok


def test_packed_targets_supervise_exactly_each_response():
    """Targets of a packed batch, against a hand-written expectation: for a sample with prompt P (A and B
    tokenised separately) and response R = ids(C) + EOS, position j predicts token j+1, so the sample's
    targets are -100 for its first len(P)-1 positions, then R, then -100 at its last token."""
    tok = build_tiny_tokenizer(["heavy duty staples glue tape"])
    tok.add_tokens(["<a_1>", "<a_3>", "<a_5>", "<b_2>", "<b_4>", "<b_6>"])
    ps = [prompts.next_sid(["<a_1><b_2>"], "<a_3><b_4>"), prompts.sid_to_title("<a_5><b_6>", "glue tape"),
          prompts.history_to_title(["<a_1><b_2>", "<a_3><b_4>"], "tape"), prompts.title_to_sid("tape", "<a_1><b_2>")]
    samples = tokenize_samples(tok, ps, cutoff_len=512)
    rows = pack_samples(samples, 2 * max(len(s.input_ids) for s in samples))
    assert any(len(r) > 1 for r in rows)
    batch = collate(rows, tok.pad_token_id)
    prompt_of = {id(s): p for s, p in zip(samples, ps)}

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    for r, row in enumerate(rows):
        pos = 0
        for s in row:
            p = prompt_of[id(s)]
            n_prompt = len(ids(p.instruction)) + len(ids(p.user_input))
            response = ids(p.target + "\n") + [tok.eos_token_id]
            want = [-100] * (n_prompt - 1) + response + [-100]
            assert batch.targets[r, pos : pos + len(want)].tolist() == want
            assert batch.weights[r, pos : pos + len(want)].gt(0).tolist() == [t != -100 for t in want]
            pos += len(want)
        assert batch.targets[r, pos:].eq(-100).all()  # row padding
