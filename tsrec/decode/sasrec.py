"""SASRec (Kang & McAuley, ICDM 2018) trained on the run's own split, an opt-in baseline (issue 21).

Pure PyTorch on CPU, no Ray. Written for tsrec from the paper's description, not taken from another code base.

**Model.** Item embedding (``n_items + 1`` rows, row 0 = padding) plus a learned absolute positional
embedding, dropout, then ``blocks`` causal self-attention blocks (pre-layer-norm: ``x + Drop(MHA(LN(x)))``,
``x + Drop(FFN(LN(x)))``, the FFN point-wise ``Linear(d, d) -> ReLU -> Dropout -> Linear(d, d)`` as in the
paper) and a final layer norm. Histories are left-padded to ``max_len`` (the data's history cap, 10 on the
MiniOneRec splits), so the most recent item always sits at the last position; a position attends to
itself and to earlier non-padding positions only (causal + key-padding mask). The user state is the last
position's output; an item's score is its dot product with the (shared) item embedding.

**Objective.** Each train row (``history_item_ids`` -> ``item_id``) is one example, with a **full softmax
cross-entropy over all catalogue items** at the last position. The paper samples one negative per positive
and uses binary cross-entropy; full softmax is the common modern variant (RecBole's default ``loss_type=CE``)
and markedly stronger on a 3.7k-item catalogue, where scoring every item costs nothing. Only the last
position is trained because tsrec's train rows are already the sliding windows of each user's sequence:
every earlier position of a history is itself the target of an earlier row, so a loss at every position
would count each transition up to ``max_history`` times (the argument of the markov baseline).

**Selection and scoring.** After every epoch the model ranks all of ``valid.parquet``; the epoch with
the best valid NDCG@10 is kept (early stopping after ``patience`` epochs without a new best, at most
``epochs``). Test rows are scored by **full ranking**: a row's 0-based rank is the number of catalogue
items scored above its target (ties: smaller item id first, as the other baselines), history items
**not** excluded (tsrec's beam search does not exclude them either, and 2.7% of Industrial test targets
repeat the last history item). The metrics are :func:`tsrec.decode.metrics.ranking_metrics` on those
ranks, the same HR@K / NDCG@K as the model's. Targets are compared by item id, like the popularity and
markov baselines (the model compares SID strings; on Industrial 15 SID groups hold more than one item).

**Determinism.** Seeded (``seed``: init, shuffling, dropout) and run with a fixed torch thread count
(``threads``, default 1), so a rerun on the same CPU build gives the same ranks.

**Cache.** :func:`fit_and_rank` writes ``sasrec.json`` (settings, per-epoch valid NDCG@10, best epoch, train
seconds, and the rank of every valid and test row) under the key ``sha256(data files + settings)``; a call
with the same key reads it instead of training again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tsrec.artifacts import InputError, atomic_write_json, file_sha256
from tsrec.decode.metrics import ndcg_at_k, ranking_metrics

CACHE_FILE = "sasrec.json"
CACHE_VERSION = 1  # bump when the model, the training or the ranking changes
SELECT_K = 10  # the epoch is chosen by valid NDCG@10


@dataclasses.dataclass(frozen=True)
class SasrecSettings:
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    # 0 = the longest history in the data (the data stage's max_history cap).
    max_len: int = 0
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10
    seed: int = 0
    threads: int = 1


class _Block(nn.Module):
    """One causal self-attention block: pre-LN multi-head attention and a point-wise FFN, both residual."""

    def __init__(self, d: int, heads: int, p: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"hidden {d} is not a multiple of heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(p), nn.Linear(d, d))
        self.drop, self.attn_drop = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)  # (b, heads, n, n)
        att = att.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        y = (self.attn_drop(att) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(nn.Module):
    """Scores every catalogue item for a batch of left-padded histories (item index + 1, 0 = padding)."""

    def __init__(self, n_items: int, max_len: int, hidden: int = 64, blocks: int = 2, heads: int = 1,
                 dropout: float = 0.2, causal: bool = True):
        super().__init__()
        self.item = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.causal = causal  # False only to show that the tests notice a model that sees the future
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def states(self, seq: torch.Tensor) -> torch.Tensor:
        """``(batch, len, hidden)`` outputs; position ``t`` has seen positions ``<= t`` only. Positions are
        right-aligned (the last column is position ``max_len - 1``), so ``len`` may be shorter than ``max_len``."""
        n, cap = seq.shape[1], self.pos.num_embeddings
        if n > cap:
            raise ValueError(f"sequence length {n} > max_len {cap}")
        keep = seq > 0
        x = self.drop(self.item(seq) + self.pos(torch.arange(cap - n, cap, device=seq.device)))
        x = x * keep[..., None]
        eye = torch.eye(n, dtype=torch.bool, device=seq.device)
        order = torch.ones(n, n, dtype=torch.bool, device=seq.device)
        order = torch.tril(order) if self.causal else order
        allowed = (order[None] & keep[:, None, :]) | eye[None]  # a position always sees itself (no empty row)
        for block in self.blocks:
            x = block(x, allowed) * keep[..., None]
        return self.norm(x)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``(batch, n_items)`` scores from the last position (the most recent item)."""
        return self.states(seq)[:, -1] @ self.item.weight[1:].T


def _encode(histories: Sequence[Sequence[int] | None], catalogue: np.ndarray, max_len: int, source: str) -> torch.Tensor:
    """Left-padded ``(rows, max_len)`` int64 of catalogue index + 1 (0 = padding), most recent ``max_len`` kept."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, h in enumerate(histories):
        h = list(h or [])[-max_len:]
        if h:
            out[i, max_len - len(h):] = _index(np.asarray(h, dtype=np.int64), catalogue, source, "history_item_ids") + 1
    return torch.from_numpy(out)


def _index(ids: np.ndarray, catalogue: np.ndarray, source: str, field: str) -> np.ndarray:
    idx = np.searchsorted(catalogue, ids)
    bad = (idx >= len(catalogue)) | (catalogue[np.minimum(idx, len(catalogue) - 1)] != ids)
    if np.any(bad):
        raise InputError(source, f"item id {int(ids[np.argmax(bad)])} is not in the catalogue", field=field)
    return idx


@torch.no_grad()
def full_ranks(model: SASRec, seq: torch.Tensor, targets: torch.Tensor, batch: int = 1024) -> np.ndarray:
    """0-based rank of each target among all catalogue items (ties: smaller catalogue index first)."""
    model.eval()
    ranks = []
    for s in range(0, len(seq), batch):
        scores = model(seq[s:s + batch])
        t = targets[s:s + batch]
        ts = scores.gather(1, t[:, None])
        ids = torch.arange(scores.shape[1])[None]
        ranks.append(((scores > ts) | ((scores == ts) & (ids < t[:, None]))).sum(1))
    return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)


def train_sasrec(train: tuple[torch.Tensor, torch.Tensor], valid: tuple[torch.Tensor, torch.Tensor], n_items: int,
                 settings: SasrecSettings, log: Callable[[str], None] | None = None,
                 causal: bool = True) -> tuple[SASRec, dict[str, Any]]:
    """Train on ``train = (seq, target index)``, keep the epoch with the best valid NDCG@10.

    Returns the model with the best epoch's weights and ``{"best_epoch", "epochs_run", "valid_ndcg@10"
    (one value per epoch), "train_seconds"}``. Call under :func:`_threads` for a fixed thread count.
    """
    s = settings
    torch.manual_seed(s.seed)
    model = SASRec(n_items, train[0].shape[1], s.hidden, s.blocks, s.heads, s.dropout, causal=causal)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(s.seed)
    seq, tgt = train
    curve: list[float] = []
    best, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    t0 = time.perf_counter()
    for epoch in range(1, s.epochs + 1):
        model.train()
        order = torch.randperm(len(seq), generator=gen)
        total = 0.0
        for b in range(0, len(order), s.batch_size):
            idx = order[b:b + s.batch_size]
            loss = nn.functional.cross_entropy(model(seq[idx]), tgt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        ndcg = ndcg_at_k(full_ranks(model, *valid).tolist(), SELECT_K)
        curve.append(round(ndcg, 6))
        if ndcg > best:
            best, best_epoch, best_state = ndcg, epoch, copy.deepcopy(model.state_dict())
        if log is not None:
            log(f"sasrec: epoch {epoch} loss {total / max(1, len(seq)):.4f} valid ndcg@{SELECT_K} {ndcg:.4f} "
                f"(best {best:.4f} at {best_epoch})")
        if epoch - best_epoch >= s.patience:
            break
    model.load_state_dict(best_state)
    return model, {"best_epoch": best_epoch, "epochs_run": len(curve), "valid_ndcg@10": curve,
                   "train_seconds": round(time.perf_counter() - t0, 1)}


class _threads:
    """Run with a fixed torch intra-op thread count, restored afterwards."""

    def __init__(self, n: int):
        self.n = max(1, int(n))

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _split_table(data_dir: Path, split: str) -> tuple[list, np.ndarray]:
    from tsrec.data.schema import read_split

    t = read_split(data_dir, split)
    for name in ("history_item_ids", "item_id"):
        if name not in t.column_names:
            raise InputError(data_dir / f"{split}.parquet", "missing column", field=name)
    return t.column("history_item_ids").to_pylist(), t.column("item_id").to_numpy().astype(np.int64)


def cache_key(data_dir: str | Path, settings: SasrecSettings) -> str:
    """``sha256`` of the data files' contents, the settings and the code version (what the ranks depend on)."""
    data_dir = Path(data_dir)
    files = {name: file_sha256(data_dir / name) for name in ("items.parquet", "train.parquet", "valid.parquet",
                                                             "test.parquet")}
    blob = json.dumps({"v": CACHE_VERSION, "data": files, "settings": dataclasses.asdict(settings),
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def fit_and_rank(data_dir: str | Path, settings: SasrecSettings, cache_dir: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on ``train.parquet`` (epoch chosen on ``valid.parquet``), rank every valid and test row.

    Returns (and, with ``cache_dir``, stores as ``cache_dir/sasrec.json``) ``{"key", "settings", "n_items",
    "max_len", "parameters", "best_epoch", "epochs_run", "valid_ndcg@10", "train_seconds", "ranks": {"valid":
    [...], "test": [...]}, "cached": bool}``; a cache with the same :func:`cache_key` is returned untrained.
    """
    from tsrec.data.schema import read_items

    data_dir = Path(data_dir)
    key = cache_key(data_dir, settings)
    cache = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    if cache is not None and cache.exists():
        try:
            old = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if old.get("key") == key:
            return {**old, "cached": True}
    catalogue = np.unique(read_items(data_dir).column("item_id").to_numpy().astype(np.int64))
    if len(catalogue) == 0:
        raise InputError(data_dir / "items.parquet", "empty catalogue")
    splits = {s: _split_table(data_dir, s) for s in ("train", "valid", "test")}
    if not len(splits["train"][1]) or not len(splits["valid"][1]):
        raise InputError(data_dir, "sasrec needs non-empty train and valid splits")
    max_len = settings.max_len or max(1, max(len(h or []) for hs, _ in splits.values() for h in hs))
    tensors = {s: (_encode(h, catalogue, max_len, f"{s}.parquet"),
                   torch.from_numpy(_index(t, catalogue, f"{s}.parquet", "item_id")))
               for s, (h, t) in splits.items()}
    with _threads(settings.threads):
        model, info = train_sasrec(tensors["train"], tensors["valid"], len(catalogue), settings, log)
        ranks = {s: full_ranks(model, *tensors[s]).tolist() for s in ("valid", "test")}
    out = {"key": key, "version": CACHE_VERSION, "settings": dataclasses.asdict(settings), "n_items": len(catalogue),
           "max_len": max_len, "parameters": sum(p.numel() for p in model.parameters()), **info, "ranks": ranks}
    if cache is not None:
        atomic_write_json(cache, out, indent=None)
    return {**out, "cached": False}


def score_sasrec_for(data_dir: str | Path, split: str, row_numbers: Sequence[int], ks: Sequence[int], beams: int,
                     settings: SasrecSettings, cache_dir: str | Path | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """``(metrics, info)``: HR@K / NDCG@K (K in ``ks``, K <= ``beams``) of SASRec on rows ``row_numbers`` of
    ``split``, and what the report shows (settings, best epoch, train seconds, whether it came from the cache)."""
    res = fit_and_rank(data_dir, settings, cache_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    ranks = res["ranks"][split]
    metrics = ranking_metrics([ranks[i] for i in row_numbers], ks, beams)
    info = {k: res[k] for k in ("settings", "n_items", "max_len", "parameters", "best_epoch", "epochs_run",
                                "train_seconds", "cached")}
    info["best_valid_ndcg@10"] = res["valid_ndcg@10"][res["best_epoch"] - 1]
    return metrics, info


def settings_from(cfg_eval: Any, seed: int) -> SasrecSettings:
    """The settings of ``eval.sasrec_*`` (the rest at their defaults)."""
    return SasrecSettings(hidden=cfg_eval.sasrec_hidden, blocks=cfg_eval.sasrec_blocks, dropout=cfg_eval.sasrec_dropout,
                          epochs=cfg_eval.sasrec_epochs, patience=cfg_eval.sasrec_patience, seed=seed)
