"""Model FLOPs of one SFT optimiser step, for MFU (model FLOPs utilisation, GPU only).

The usual ``6 x parameters x tokens`` is wrong for this loop in three ways: the LM head runs only at
supervised positions (``packing.weighted_token_loss``), frozen weights (LoRA) need no weight gradient,
and attention FLOPs depend on each sample's own length (packed samples do not attend to each other).
Counted per step, over the tokens of all ranks (padding excluded: it is not model work)::

    body  = (2 + 2) * N_body * T  +  2 * N_body_trainable * T
    head  = (2 + 2) * D * V * S   +  2 * D * V_trainable * S
    attn  = 3 * sum over samples n of  L * 2 * d_attn * n * (n + 1)

- T: real (non-padding) tokens; S: supervised tokens (the head's rows of logits).
- A matmul with a (in x out) weight costs 2 * in * out FLOPs per token forward; backward costs the same
  again for the input gradient (every layer: gradients must reach the trainable SID embedding rows and
  the adapters of the first layers) and once more for the weight gradient, only where the weight
  trains. Full fine-tuning gives 6 * N; LoRA gives 4 * N_frozen + 6 * N_adapters.
- N_body: parameters of the decoder without the input embedding (a lookup, no FLOPs) and without the LM
  head (counted in ``head``); norms are included (negligible). V_trainable: head rows that get a weight
  gradient (all V in full fine-tuning, tied or not; the SID rows under LoRA).
- Attention (no parameters): for query i of a causal sample, QK^T and AV each cost 2 * d_attn * (i + 1)
  FLOPs (d_attn = heads x head_dim); summed over i = 0..n-1 that is 2 * d_attn * n * (n + 1) per layer
  forward, times 3 for forward + backward. Flash attention skips the masked half, so this is also
  what a GPU does.
- Activation recomputation (gradient checkpointing) is hardware work, not model work: not counted (MFU,
  not HFU).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class FlopModel:
    """What the FLOP count needs to know about a model (see the module docstring for the symbols)."""

    body_params: int  # N_body
    body_trainable: int  # N_body_trainable
    hidden: int  # D
    vocab: int  # V
    head_trainable_rows: int  # V_trainable
    layers: int  # L
    attn_dim: int  # d_attn = query heads x head_dim

    def step_flops(self, real_tokens: int, supervised_tokens: int, sample_lengths: Iterable[int]) -> float:
        """Model FLOPs (forward + backward) of the given tokens."""
        body = 4 * self.body_params * real_tokens + 2 * self.body_trainable * real_tokens
        head = 4 * self.hidden * self.vocab * supervised_tokens + 2 * self.hidden * self.head_trainable_rows * supervised_tokens
        attn = 3 * sum(self.layers * 2 * self.attn_dim * n * (n + 1) for n in sample_lengths)
        return float(body + head + attn)


def flop_model(lm, head_trainable_rows: int | None = None) -> FlopModel:
    """Read a :class:`FlopModel` from a (peft-wrapped, ZeRO-3-partitioned or plain) causal LM.

    Args:
        lm: the model as trained (after LoRA is applied: adapters count as trainable, frozen weights not).
        head_trainable_rows: LM-head rows with a weight gradient; ``None`` = every row if the head's weight
            requires grad, else 0. LoRA passes the number of SID rows (trainable token rows).
    """
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    skip = {id(p) for m in (emb, head) if m is not None for p in m.parameters()}
    n_body = n_train = 0
    for p in lm.parameters():
        if id(p) in skip:
            continue
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hold a stub; ds_numel is the full size
        n_body += n
        n_train += n if p.requires_grad else 0
    vocab = cfg.vocab_size
    if head_trainable_rows is None:
        weight = getattr(head, "weight", None)
        head_trainable_rows = vocab if weight is not None and weight.requires_grad else 0
    return FlopModel(body_params=n_body, body_trainable=n_train, hidden=cfg.hidden_size, vocab=vocab,
                     head_trainable_rows=head_trainable_rows, layers=cfg.num_hidden_layers, attn_dim=heads * head_dim)


# Dense bf16 peak FLOP/s per GPU for the MFU estimate (GPU only; CPU reports none).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops() -> float:
    """The current CUDA device's dense bf16 peak (H100's when the name is unknown)."""
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)
