"""Packing under flash attention: packed micro-batches of several rows keep every sample to itself.

flash-attn does not run on CPU, so the CPU test keeps transformers' whole flash dispatch
(``integrations.flash_attention.flash_attention_forward`` -> ``_flash_attention_forward``: its choice
between the dense kernel, varlen from explicit ``cu_seq_lens`` and varlen inferred from position ids)
and swaps only the two kernels at the bottom for pure-torch equivalents with flash-attn's signatures.
An (R, T) batch that reaches the dense kernel with causal=True lets later samples in a row attend to
earlier ones, and the per-sample equality below fails. The ``gpu`` test runs the real kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tsrec import prompts
from tsrec.sft.packing import batch_loss, collate, pack_samples
from tsrec.sft.tasks import tokenize_samples
from tsrec.tiny import build_tiny_model, build_tiny_tokenizer

SIDS = ["<a_1>", "<a_3>", "<a_5>", "<b_2>", "<b_4>", "<b_6>"]


def _samples(tok):
    sids = ["<a_1><b_2>", "<a_3><b_4>", "<a_5><b_6>"]
    ps = [
        prompts.next_sid(sids[:1], sids[1]),
        prompts.next_sid(sids[:2], sids[2]),
        prompts.sid_to_title(sids[0], "heavy duty staples"),
        prompts.title_to_sid("glue tape", sids[2]),
        prompts.history_to_title(sids, "tape"),
        prompts.token_to_description("<a_1>", "a family of staples"),
        prompts.next_sid(sids[1:], sids[0]),
        prompts.sid_to_title(sids[2], "glue"),
    ]
    return tokenize_samples(tok, ps, cutoff_len=512)


def _packed_rows(samples):
    """At least two rows, and at least one row holding several samples."""
    rows = pack_samples(samples, 2 * max(len(s.input_ids) for s in samples))
    assert len(rows) >= 2 and any(len(r) >= 2 for r in rows)
    return rows


def _reference_loss(model, samples) -> float:
    """Each sample alone (batch 1, no padding), ordinary HF forward: the token mean over all samples."""
    num = den = 0.0
    for s in samples:
        logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1].float()
        tgt = torch.tensor(s.labels[1:])
        num += F.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum").item()
        den += int((tgt != -100).sum())
    return num / den


def _expand_kv(q, k, v):
    rep = q.shape[-2] // k.shape[-2]  # grouped-query attention: repeat kv heads as flash-attn does
    return k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)


class TorchFlash:
    """``flash_attn_func`` / ``flash_attn_varlen_func`` in plain torch (same argument names), with call records."""

    def __init__(self):
        self.dense_calls = 0
        self.varlen_cu: list[list[int]] = []

    def dense(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, deterministic=False, return_attn_probs=False):
        # q: (B, S, H, D)
        self.dense_calls += 1
        k, v = _expand_kv(q, k, v)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
               deterministic=False, return_attn_probs=False, block_table=None):
        # q: (total, H, D); each [cu[i], cu[i+1]) is one sequence.
        cu = cu_seqlens_q.tolist()
        assert cu == cu_seqlens_k.tolist() and max_seqlen_q == max(b - a for a, b in zip(cu, cu[1:]))
        self.varlen_cu.append(cu)
        k, v = _expand_kv(q, k, v)
        parts = []
        for a, b in zip(cu, cu[1:]):
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                               is_causal=causal, scale=softmax_scale)
            parts.append(o.transpose(0, 1))
        return torch.cat(parts)


@pytest.fixture
def torch_flash(monkeypatch):
    """Load the pure-torch kernels as transformers' "flash_attention_2" (its lazy-import cache)."""
    import transformers.modeling_flash_attention_utils as fa

    kernels = TorchFlash()
    monkeypatch.setattr(fa, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa, "_flash_fn", kernels.dense)
    monkeypatch.setattr(fa, "_flash_varlen_fn", kernels.varlen)
    monkeypatch.setattr(fa, "_flash_with_kvcache_fn", None)
    monkeypatch.setattr(fa, "_pad_fn", fa._pad_input)
    monkeypatch.setattr(fa, "_unpad_fn", fa._unpad_input)
    monkeypatch.setattr(fa, "_process_flash_kwargs_fn", fa._lazy_define_process_function(kernels.varlen))
    monkeypatch.setattr(fa, "_process_with_kvcache_kwargs_fn", dict)
    return kernels


def test_flash_dispatch_keeps_packed_samples_apart(torch_flash):
    tok = build_tiny_tokenizer(["heavy duty staples glue tape"])
    tok.add_tokens(SIDS)
    model = build_tiny_model(len(tok), seed=5).eval()
    samples = _samples(tok)
    rows = _packed_rows(samples)
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        want = _reference_loss(model, samples)  # sdpa, one sample at a time
        model.config._attn_implementation = "flash_attention_2"  # every layer reads the shared config
        got = batch_loss(model, batch).item()
    assert abs(got - want) < 1e-5, (got, want)
    # The flash path really ran, varlen only, with one segment per sample (+ one per row's padding).
    assert torch_flash.varlen_cu and torch_flash.dense_calls == 0
    bounds, width = [0], batch.input_ids.shape[1]
    for r, row in enumerate(rows):
        for s in row:
            bounds.append(bounds[-1] + len(s.input_ids))
        if bounds[-1] < (r + 1) * width:
            bounds.append((r + 1) * width)
    assert torch_flash.varlen_cu[0] == bounds


@pytest.mark.gpu
def test_flash_attention_2_kernel_packed_equals_per_sample(tmp_path):
    """The real flash-attn kernel (bf16, CUDA): packed rows give each sample's own hidden states.

    bf16 rounding is of the same order as the effect of a few extra attended tokens in a random tiny
    model, so the value/output projections are scaled up (attention then dominates the residual stream)
    and the packed error is compared with the error of the same rows run as plain causal rows.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    from tsrec.sft.packing import forward_hidden

    tok = build_tiny_tokenizer(["heavy duty staples glue tape"])
    tok.add_tokens(SIDS)
    model = build_tiny_model(len(tok), hidden_size=128, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "v_proj" in name or "o_proj" in name:
                p.mul_(20.0)
    model.save_pretrained(tmp_path)
    samples = _samples(tok)
    rows = _packed_rows(samples)
    batch = collate(rows, tok.pad_token_id)
    batch = type(batch)(**{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()})
    flash = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    with torch.no_grad():
        packed = forward_hidden(flash, batch).float()
        rows_causal = flash.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                          use_cache=False).last_hidden_state.float()  # the old feed
        err_packed = err_rows = 0.0
        for r, row in enumerate(rows):
            pos = 0
            for s in row:
                n = len(s.input_ids)
                alone = flash.get_decoder()(input_ids=torch.tensor([s.input_ids], device="cuda"),
                                            use_cache=False).last_hidden_state[0].float()
                err_packed = max(err_packed, (packed[r, pos : pos + n] - alone).abs().max().item())
                err_rows = max(err_rows, (rows_causal[r, pos : pos + n] - alone).abs().max().item())
                pos += n
    assert err_packed * 4 < err_rows, (err_packed, err_rows)
