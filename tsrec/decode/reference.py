"""Reference decoders for tests and benchmarks: the public-pipeline baseline and exhaustive scoring.

Stage: none (verification only; METHOD.md 1.8, R4).

- :func:`hf_prefix_beam_search` is the way public pipelines decode: ``model.generate`` beam search
  with a ``prefix_allowed_tokens_fn`` that walks a Python dict trie per beam per step. It is run with
  an explicit generation config (``do_sample=False``, ``length_penalty=0``, ``num_beams =
  num_return_sequences = K``) and ``max_new_tokens = L`` with only the SID levels constrained, so its
  score is the same sum of L full-vocabulary log-probabilities as :mod:`tsrec.decode.beam`; with
  ``suffix_ids`` (``\\n``, EOS) it walks the upstream trie, whose two extra steps add two more
  terms (``score_suffix_ids`` of the tensor search, used in ``prompts.mode=upstream``).
- :func:`exhaustive_scores` scores every catalogue SID (optionally + suffix) by teacher forcing: the
  ground truth for the exactness test.
- :func:`compare_topk` tells a near-tie (swapped SIDs whose scores agree within a tolerance) from a
  real mismatch between two decoders' lists (benchmarks/decode.py).
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from tsrec.decode.constraints import SidConstraints


@torch.inference_mode()
def hf_prefix_beam_search(model, input_ids, attention_mask, constraints: SidConstraints, beams: int, pad_id: int,
                          suffix_ids: Sequence[int] = ()):
    """Top-K SIDs with transformers' beam search and a Python-trie ``prefix_allowed_tokens_fn``.

    ``suffix_ids`` extends every trie path with those forced ids (the upstream trie: ``\\n``, EOS),
    so they are generated and scored as in the public pipeline.

    Returns:
        ``(sids, scores)``: ``[prompt][rank]`` SID strings and ``(B, K)`` float32 sequence scores.
    """
    from transformers import GenerationConfig

    trie = constraints.python_trie()
    suffix = [int(i) for i in suffix_ids]
    for row in constraints.sid_token_ids.tolist():
        for j, nxt in enumerate(suffix):
            trie[tuple(row) + tuple(suffix[:j])] = [nxt]
    sid_of = {tuple(r): s for r, s in zip(constraints.sid_token_ids.tolist(), constraints.sids)}
    T = input_ids.shape[1]

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        return trie.get(tuple(ids[T:].tolist()), [])

    gen_cfg = GenerationConfig(
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=constraints.num_levels + len(suffix),
        do_sample=False,
        length_penalty=0.0,
        early_stopping=False,
        pad_token_id=pad_id,
        eos_token_id=pad_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=gen_cfg,
        prefix_allowed_tokens_fn=allowed,
    )
    gen = out.sequences[:, T:].tolist()
    B = input_ids.shape[0]
    L = constraints.num_levels
    sids = [[sid_of.get(tuple(gen[b * beams + k][:L]), "") for k in range(beams)] for b in range(B)]
    return sids, out.sequences_scores.view(B, beams).float()


@torch.inference_mode()
def exhaustive_scores(model, prompt_ids: list[int], constraints: SidConstraints,
                      suffix_ids: Sequence[int] = ()) -> torch.Tensor:
    """``(S,)`` sum of full-vocabulary log-probs of every catalogue SID (+ ``suffix_ids``) after one prompt.

    The sequences are built on the model's device (a CUDA model gets CUDA inputs); the scores come back there.
    """
    device = _model_device(model)
    sid_ids = constraints.sid_token_ids.to(device)
    if suffix_ids:
        suffix = torch.tensor(list(suffix_ids), dtype=torch.long, device=device)
        sid_ids = torch.cat([sid_ids, suffix.expand(sid_ids.shape[0], -1)], 1)
    S, L = sid_ids.shape
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0).expand(S, -1)
    seq = torch.cat([prompt, sid_ids], dim=1)
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits.float()
    logp = torch.log_softmax(logits[:, len(prompt_ids) - 1 : -1, :], dim=-1)  # predicts each SID token
    return logp.gather(-1, sid_ids.unsqueeze(-1)).squeeze(-1).sum(-1)


def _model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless callable)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def compare_topk(a_sids: Sequence[str], a_scores: Sequence[float], b_sids: Sequence[str], b_scores: Sequence[float],
                 tol: float) -> str:
    """Classify two top-K lists of one prompt: ``identical``, ``near-tie`` or ``mismatch``.

    Two correct decoders may order candidates whose scores differ by float rounding differently
    (different kernels, batch shapes). The lists are a ``near-tie`` when (1) at every rank where they
    differ both decoders' scores differ by less than ``tol`` (so the swapped SIDs score the same
    within ``tol``) and (2) every SID both return gets the same score within ``tol``. Anything else is
    a real ``mismatch``.
    """
    if list(a_sids) == list(b_sids):
        return "identical"
    if len(a_sids) != len(b_sids):
        return "mismatch"
    for k, (x, y) in enumerate(zip(a_sids, b_sids)):
        if x != y and not abs(float(a_scores[k]) - float(b_scores[k])) < tol:
            return "mismatch"
    b_score_of = dict(zip(b_sids, b_scores))
    for sid, score in zip(a_sids, a_scores):
        if sid in b_score_of and not abs(float(score) - float(b_score_of[sid])) < tol:
            return "mismatch"
    return "near-tie"
