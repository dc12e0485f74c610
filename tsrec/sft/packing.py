"""Batching without waste and the SFT loss (METHOD.md 1.6, requirement R6).

Packing: samples go into rows of at most ``pack_len`` tokens (first-fit decreasing, deterministic).
Position ids restart at 0 for every sample; with no 2D attention mask, transformers 5.x
(``masking_utils.find_packed_sequence_indices``) turns restarting position ids into a block-causal
mask for sdpa/eager, per row, so attention stays inside each sample. Flash attention does not: its
packed-sequence detection (``modeling_flash_attention_utils._is_packed_sequence``) only looks at batch
size 1, so an (R, T) batch of packed rows would run as R plain causal rows and samples would attend to
each other. Under any flash implementation ``forward_hidden`` therefore feeds the micro-batch as one
row of R*T tokens together with explicit cumulative sequence lengths (``cu_seq_lens_q/k``,
``max_length_q/k``, the kwargs transformers passes to ``flash_attn_varlen_func``), one segment per
sample. Padding at the end of a row is one more "sample" of positions 0..k with no labels, so it is
never attended to by real tokens. Unpacked batches (``sft.packing: false``) are length-grouped within
each step and use the same collate with one sample per row.

Targets are shifted **per sample** (a sample's last token predicts nothing), so the loss of a packed
batch equals the loss of the same samples unpacked.

Loss: per-token cross-entropy on response tokens, times the task's ``loss_weight``, summed; the training
loop divides by the summed weights of all supervised tokens in the optimiser step (all ranks, all
micro-batches), i.e. a weighted mean over supervised tokens that does not depend on how samples are
grouped into rows, micro-batches or ranks. Logits are computed only at supervised positions (hidden
states gathered first, then the LM head): with a 152k vocabulary this avoids (B, T, V) fp32 logits (R6).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tsrec.sft.tasks import TASK_NAMES, TokenizedSample

IGNORE = -100


@dataclass
class Batch:
    """A collated micro-batch. R rows, T tokens per row."""

    input_ids: torch.Tensor  # (R, T)
    position_ids: torch.Tensor  # (R, T) restart at 0 per sample
    targets: torch.Tensor  # (R, T) next-token target per position, -100 where unsupervised
    weights: torch.Tensor  # (R, T) float loss weight of each target, 0 where unsupervised
    task_ids: torch.Tensor  # (R, T) index into TASK_NAMES of each target, -1 where unsupervised
    real_tokens: int  # non-padding tokens
    num_samples: int
    # Varlen boundaries over the flattened (R*T) batch: start of every segment (sample or row padding)
    # plus the total, int32 as flash_attn_varlen_func wants; and the longest segment.
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    sample_lengths: tuple[int, ...] = ()  # token count of each real sample (attention FLOPs, ``tsrec.sft.flops``)

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def pad_tokens(self) -> int:
        return self.total_tokens - self.real_tokens

    @property
    def weight_sum(self) -> float:
        return float(self.weights.sum())


def pack_samples(samples: Sequence[TokenizedSample], pack_len: int) -> list[list[TokenizedSample]]:
    """First-fit decreasing: longest samples first, each into the first row with room. Deterministic.

    A sample longer than ``pack_len`` gets a row of its own (``encode_sft`` already cut it to cutoff_len).
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    rows: list[list[TokenizedSample]] = []
    free: list[int] = []
    for i in order:
        n = len(samples[i].input_ids)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(samples[i])
                free[r] -= n
                break
        else:
            rows.append([samples[i]])
            free.append(pack_len - n)
    return rows


def collate(rows: Sequence[Sequence[TokenizedSample]], pad_id: int, pad_to_multiple: int = 8) -> Batch:
    """Concatenate each row's samples, right-pad rows to the longest (a multiple of ``pad_to_multiple``).

    An empty ``rows`` gives one dummy row of padding (used when a rank has fewer rows than
    micro-batches: every rank must run the same number of forward passes under ZeRO-3).
    """
    if not rows:
        rows = [[]]
    longest = max(sum(len(s.input_ids) for s in row) for row in rows)
    width = max(pad_to_multiple, -(-longest // pad_to_multiple) * pad_to_multiple)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    task_ids = torch.full(shape, -1, dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        pos = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[r, pos : pos + n] = torch.tensor(s.input_ids)
            position_ids[r, pos : pos + n] = torch.arange(n)
            shifted = torch.tensor(list(s.labels[1:]) + [IGNORE])  # per-sample shift: last token predicts nothing
            targets[r, pos : pos + n] = shifted
            sup = shifted != IGNORE
            weights[r, pos : pos + n] = sup.float() * s.loss_weight
            task_ids[r, pos : pos + n] = torch.where(sup, TASK_NAMES.index(s.task) if s.task in TASK_NAMES else 0, -1)
            pos += n
        real += pos
        position_ids[r, pos:] = torch.arange(width - pos)  # padding: its own segment
    # Every segment starts at position 0 and is non-empty, so the zeros of the flat position ids are
    # exactly the segment starts.
    flat = position_ids.reshape(-1)
    cu = torch.cat([(flat == 0).nonzero().reshape(-1), torch.tensor([flat.numel()])]).to(torch.int32)
    lengths = tuple(len(s.input_ids) for row in rows for s in row)
    return Batch(input_ids, position_ids, targets, weights, task_ids, real, len(lengths),
                 cu_seqlens=cu, max_seqlen=int(cu.diff().max()), sample_lengths=lengths)


def micro_batches(samples: Sequence[TokenizedSample], num_micro: int, packing: bool, pack_len: int,
                  micro_batch_size: int, pad_id: int) -> list[Batch]:
    """Split one rank's share of an optimiser step into exactly ``num_micro`` collated micro-batches.

    Packed: pack into rows, then deal rows out in contiguous groups. Unpacked: length-grouped, one
    sample per row sorted by length (stable), ``micro_batch_size`` rows per group (the last groups may
    be smaller or empty dummies). Grouping never changes the step's loss (a token mean over the step).
    """
    if packing:
        rows = pack_samples(samples, pack_len)
    else:
        rows = [[s] for s in sorted(samples, key=lambda s: len(s.input_ids))]
    if not packing and len(rows) > num_micro * micro_batch_size:
        raise ValueError(f"{len(rows)} samples do not fit {num_micro} micro-batches of {micro_batch_size}")
    per = -(-len(rows) // num_micro) if rows else 0
    groups = [rows[i * per : (i + 1) * per] for i in range(num_micro)] if per else [[] for _ in range(num_micro)]
    return [collate(g, pad_id) for g in groups]


def uses_varlen(lm) -> bool:
    """True when ``lm`` runs a flash-attention implementation (flash_attention_2/3, hub flash kernels)."""
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(lm.config)


def forward_hidden(lm, batch: Batch) -> torch.Tensor:
    """Last hidden states of a causal LM's decoder for a (packed) batch. (R, T, D)

    sdpa/eager: R rows, the block-causal mask comes from the restarting position ids. Flash: one row of
    R*T tokens plus cumulative lengths, so transformers takes the varlen path (module docstring).
    """
    decoder = lm.get_decoder()
    if not uses_varlen(lm):
        out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False)
        return out.last_hidden_state
    if batch.cu_seqlens is None:
        raise ValueError("a flash-attention forward needs Batch.cu_seqlens (build batches with packing.collate)")
    r, t = batch.input_ids.shape
    cu = batch.cu_seqlens.to(batch.input_ids.device)
    out = decoder(input_ids=batch.input_ids.reshape(1, r * t), position_ids=batch.position_ids.reshape(1, r * t),
                  attention_mask=None, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                  max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen)
    return out.last_hidden_state.reshape(r, t, -1)


def weighted_token_loss(hidden: torch.Tensor, lm_head, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of ``loss_weight * CE`` over supervised positions, plus per-task CE sums and token counts.

    Logits only at supervised positions (R6). Returns ``(weighted_sum, task_ce_sum, task_count)``; the
    caller divides by the step's total weight. A batch with no supervised token returns a zero that is
    still connected to the graph, so backward runs on every rank.
    """
    flat = batch.targets.reshape(-1)
    idx = (flat != IGNORE).nonzero(as_tuple=True)[0]  # (N,)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx.to(hidden.device))  # (N, D)
    logits = lm_head(h).float()  # (N, V)
    ce = F.cross_entropy(logits, flat[idx].to(logits.device), reduction="none")  # (N,)
    w = batch.weights.reshape(-1)[idx].to(ce.device)
    total = (ce * w).sum() + hidden.sum() * 0.0
    tasks = batch.task_ids.reshape(-1)[idx].to(ce.device)
    task_sum = torch.zeros(len(TASK_NAMES), device=ce.device).index_add_(0, tasks, ce.detach())
    task_cnt = torch.zeros(len(TASK_NAMES), device=ce.device).index_add_(0, tasks, torch.ones_like(ce))
    return total, task_sum, task_cnt


def batch_loss(lm, batch: Batch) -> torch.Tensor:
    """Weighted mean token loss of one batch (tests, benchmarks): sum(w * CE) / sum(w)."""
    total, _, _ = weighted_token_loss(forward_hidden(lm, batch), lm.get_output_embeddings(), batch)
    return total / max(batch.weight_sum, 1e-12)


def padding_share(batches: Sequence[Batch]) -> float:
    """Padding tokens / all tokens over the given batches."""
    total = sum(b.total_tokens for b in batches)
    return sum(b.pad_tokens for b in batches) / total if total else 0.0
