"""Reference decoders for tests and benchmarks: the public-pipeline baseline and exhaustive scoring.

Stage: none (verification only; METHOD.md 1.8, R4).

- :func:`hf_prefix_beam_search` is the way public pipelines decode: ``model.generate`` beam search
  with a ``prefix_allowed_tokens_fn`` that walks a Python dict trie per beam per step. It is run with
  an explicit generation config (``do_sample=False``, ``length_penalty=0``, ``num_beams =
  num_return_sequences = K``) and ``max_new_tokens = L`` with only the SID levels constrained, so its
  score is the same sum of L full-vocabulary log-probabilities as :mod:`tsrec.decode.beam` (the
  upstream trie's ``\\n`` and EOS steps would add two more terms; "nothing after the last level is
  scored" is the tsrec contract).
- :func:`exhaustive_scores` scores every catalogue SID by teacher forcing: the ground truth for the
  exactness test.
"""

from __future__ import annotations

import torch

from tsrec.decode.constraints import SidConstraints


@torch.inference_mode()
def hf_prefix_beam_search(model, input_ids, attention_mask, constraints: SidConstraints, beams: int, pad_id: int):
    """Top-K SIDs with transformers' beam search and a Python-trie ``prefix_allowed_tokens_fn``.

    Returns:
        ``(sids, scores)``: ``[prompt][rank]`` SID strings and ``(B, K)`` float32 sequence scores.
    """
    from transformers import GenerationConfig

    trie = constraints.python_trie()
    sid_of = {tuple(r): s for r, s in zip(constraints.sid_token_ids.tolist(), constraints.sids)}
    T = input_ids.shape[1]

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        return trie.get(tuple(ids[T:].tolist()), [])

    gen_cfg = GenerationConfig(
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=constraints.num_levels,
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
    sids = [[sid_of.get(tuple(gen[b * beams + k]), "") for k in range(beams)] for b in range(B)]
    return sids, out.sequences_scores.view(B, beams).float()


@torch.inference_mode()
def exhaustive_scores(model, prompt_ids: list[int], constraints: SidConstraints) -> torch.Tensor:
    """``(S,)`` sum of full-vocabulary log-probs of every catalogue SID after one prompt (teacher forcing)."""
    sid_ids = constraints.sid_token_ids.cpu()
    S, L = sid_ids.shape
    prompt = torch.tensor(prompt_ids, dtype=torch.long).unsqueeze(0).expand(S, -1)
    seq = torch.cat([prompt, sid_ids], dim=1)
    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits.float()
    logp = torch.log_softmax(logits[:, len(prompt_ids) - 1 : -1, :], dim=-1)  # predicts each SID token
    return logp.gather(-1, sid_ids.unsqueeze(-1)).squeeze(-1).sum(-1)
