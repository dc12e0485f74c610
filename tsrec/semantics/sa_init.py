"""SA-Init: Semantic-Aware embedding Initialisation (METHOD.md 1.5). Pure tensor code, no I/O.

For each teacher record (token t, keywords k_1..k_n), in file order::

    s_t = k_1 + " " + ... + " " + k_n
    u   = tokenizer(s_t, add_special_tokens=False).input_ids          (m sub-word ids)
    v_t = (1/m) * sum_j E[u_j]                                         (flat mean, not a mean of means)
    rho = mean_r ||E[r]||_2                                             (ALL rows, recomputed per token)
    E[id(t)] <- v_t * rho / (||v_t||_2 + 1e-6)

Depth d initialises the first d SID levels (records filtered by token prefix); other SID rows keep
their baseline init, and rho is still taken over all rows. ``source="description"`` embeds the
description text instead of the joined keywords (the disabled variant of the public code).

Computed in float32 (rho's running sum in float64) whatever the table's dtype, then cast back.
"rho recomputed before every token" is implemented exactly but cheaply: the row norms are computed
once and the one overwritten row's norm is updated after each token, so rho before token t is the
mean over the table as it is at that moment.

Differs from the public code: it computes in the model dtype (bf16); tsrec computes in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tsrec.sid.index import token_level

EPS = 1e-6


def select_records(records: Sequence[dict[str, Any]], depth: int) -> list[dict[str, Any]]:
    """Records whose token is in the first ``depth`` SID levels (``<a_*>`` = level 0), file order kept."""
    if not 0 <= depth <= 3:
        raise ValueError(f"sa_init.depth must be 0..3, got {depth}")
    return [r for r in records if token_level(r["token"]) < depth]


def init_text(record: dict[str, Any], source: str) -> str:
    """The text SA-Init embeds: keywords joined by single spaces, or the description."""
    if source == "keywords":
        return " ".join(record["keywords"])
    if source == "description":
        return record["description"]
    raise ValueError(f"sa_init.source must be keywords or description, got {source!r}")


def sa_init_rows(embedding: torch.Tensor, row_ids: Sequence[int], piece_ids: Sequence[Sequence[int]],
                 eps: float = EPS) -> torch.Tensor:
    """Apply SA-Init to an embedding table and return the new table (same dtype and device).

    Args:
        embedding: (V, D) input (or output) embedding matrix, already resized to hold the SID rows.
        row_ids: the SID token's row for each record, in file order.
        piece_ids: the sub-word ids of each record's text (``tokenizer(text, add_special_tokens=False)``).
        eps: added to ``||v_t||`` (METHOD.md 1.5).

    Returns:
        (V, D) tensor: a copy of ``embedding`` with the ``row_ids`` rows overwritten.

    Raises:
        ValueError: a record with no sub-word ids, or an id outside the table.
    """
    if len(row_ids) != len(piece_ids):
        raise ValueError(f"{len(row_ids)} rows but {len(piece_ids)} id lists")
    table = embedding.detach().to(torch.float32).clone()  # (V, D)
    n_rows = table.shape[0]
    norms = table.norm(dim=1).to(torch.float64)  # (V,) kept current as rows are overwritten
    norm_sum = norms.sum()
    for row, ids in zip(row_ids, piece_ids):
        if not ids:
            raise ValueError(f"row {row}: the SA-Init text tokenizes to no ids")
        if not 0 <= row < n_rows or min(ids) < 0 or max(ids) >= n_rows:
            raise ValueError(f"row {row} or a piece id is outside the {n_rows}-row table")
        v = table[torch.as_tensor(list(ids))].mean(dim=0)  # (D,) flat mean over all pieces
        rho = (norm_sum / n_rows).to(torch.float32)  # mean row norm over ALL rows, as they are now
        new = v * rho / (v.norm() + eps)
        table[row] = new
        new_norm = new.norm().to(torch.float64)
        norm_sum = norm_sum - norms[row] + new_norm
        norms[row] = new_norm
    return table.to(embedding.dtype)
