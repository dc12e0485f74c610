"""Reference recommenders scored beside the model in every evaluation (issue 10): most-popular and
first-order transition ("markov"). Pure numpy/pandas, no torch, no Ray.

Both are fitted on the **train** split only and ranked over the catalogue (``items.parquet``), so they
see exactly what the model saw in training, and they are scored on the same evaluated rows with the
same metrics (:func:`tsrec.decode.metrics.ranking_metrics`, K in ``eval.ks`` up to ``eval.beams``).
Every item has one SID, so comparing item ids is the same as comparing SIDs.

- **popularity**: ``pop[j]`` = number of train rows whose target is ``j``. Every row gets the same list:
  ``pop`` descending, ties by smaller ``item_id``.
- **markov**: ``count[i, j]`` = number of train rows whose *last history item* is ``i`` and whose target
  is ``j``. A row whose last history item is ``i`` gets the successors of ``i`` by ``count`` descending
  (ties: ``pop`` descending, then smaller ``item_id``), then **backs off** to the popularity list (items
  already listed skipped). An empty history or an ``i`` never seen as a last item gives the popularity
  list.

Why only (last history item -> target) pairs and not the consecutive pairs inside histories: train rows
are sliding windows over each user's sequence, so every pair inside a history was already the
(last item -> target) pair of an earlier train row; counting history pairs too would repeat each
transition up to ``max_history`` times and weight users with long sequences more. Each observed
transition is therefore counted exactly once. (Consequence: a transition seen only inside a history
whose own row fell outside train, e.g. in a truncated source, is not counted.)

A third, opt-in baseline trains a SASRec on the same split (``eval.sasrec``; :mod:`tsrec.decode.sasrec`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tsrec.artifacts import InputError
from tsrec.decode.metrics import ranking_metrics


def _columns(table: Any, source: str) -> pd.DataFrame:
    """``history_item_ids`` / ``item_id`` of a split as a DataFrame (pyarrow table or DataFrame in)."""
    df = table if isinstance(table, pd.DataFrame) else table.to_pandas()
    for name in ("history_item_ids", "item_id"):
        if name not in df.columns:
            raise InputError(source, "missing column", field=name)
    return df


def _last_items(histories: pd.Series) -> np.ndarray:
    """Last history item per row, -1 for an empty (or null) history."""
    return np.fromiter((h[-1] if h is not None and len(h) else -1 for h in histories), dtype=np.int64,
                       count=len(histories))


def popularity_order(train: pd.DataFrame, catalogue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, pop)``: catalogue item ids by train-target count descending, ties by smaller id;
    ``pop`` is aligned with ``catalogue`` (sorted unique ids)."""
    targets = train["item_id"].to_numpy(dtype=np.int64)
    idx = np.searchsorted(catalogue, targets)
    if len(targets) and (np.any(idx >= len(catalogue)) or np.any(catalogue[np.minimum(idx, len(catalogue) - 1)] != targets)):
        raise InputError("train.parquet", "a target item id is not in the catalogue", field="item_id")
    pop = np.bincount(idx, minlength=len(catalogue)).astype(np.int64)
    order = catalogue[np.lexsort((catalogue, -pop))]  # last key is primary: pop desc, then id asc
    return order, pop


def markov_tables(train: pd.DataFrame, catalogue: np.ndarray, pop: np.ndarray, length: int) -> dict[int, np.ndarray]:
    """Per last-history item ``i``: its top-``length`` list (successors, then popularity back-off)."""
    src = _last_items(train["history_item_ids"])
    pairs = pd.DataFrame({"src": src, "dst": train["item_id"].to_numpy(dtype=np.int64)})
    pairs = pairs[pairs["src"] >= 0]
    counts = pairs.groupby(["src", "dst"], sort=False).size().rename("n").reset_index()
    counts["pop"] = pop[np.searchsorted(catalogue, counts["dst"].to_numpy())]
    # successors: count desc, then popularity desc, then smaller id (deterministic)
    counts = counts.sort_values(["src", "n", "pop", "dst"], ascending=[True, False, False, True], kind="mergesort")
    counts = counts.groupby("src", sort=False).head(length)
    order, _ = popularity_order(train, catalogue)
    fill = order[: 2 * length]  # at most `length` of these can repeat a successor
    tables: dict[int, np.ndarray] = {}
    for s, dst in counts.groupby("src", sort=False)["dst"]:
        head = dst.to_numpy()
        rest = fill[~np.isin(fill, head)]
        tables[int(s)] = np.concatenate([head, rest])[:length]
    return tables


def _ranks(lists: np.ndarray, targets: np.ndarray) -> list[int | None]:
    """0-based first position of each row's target in its list (None = not in the list)."""
    hit = lists == targets[:, None]
    found = hit.any(axis=1)
    pos = hit.argmax(axis=1)
    return [int(p) if f else None for p, f in zip(pos, found)]


def baseline_rankings(train: Any, rows: Any, catalogue: Sequence[int], length: int) -> dict[str, np.ndarray]:
    """Top-``length`` item ids per evaluated row for each baseline: ``{name: (rows, <=length) int64}``."""
    train_df = _columns(train, "train.parquet")
    rows_df = _columns(rows, "split")
    cat = np.unique(np.asarray(catalogue, dtype=np.int64))
    if len(cat) == 0:
        raise InputError("items.parquet", "empty catalogue")
    length = min(int(length), len(cat))
    order, pop = popularity_order(train_df, cat)
    top = order[:length]
    n = len(rows_df)
    tables = markov_tables(train_df, cat, pop, length)
    last = _last_items(rows_df["history_item_ids"])
    markov = np.tile(top, (n, 1))
    for i, src in enumerate(last):  # rows whose last item was never a train source keep popularity
        t = tables.get(int(src))
        if t is not None:
            markov[i] = t
    return {"popularity": np.tile(top, (n, 1)), "markov": markov}


def score_baselines(train: Any, rows: Any, catalogue: Sequence[int], ks: Sequence[int], beams: int) -> dict[str, dict[str, float]]:
    """``{"popularity": {"hr@K": ..., "ndcg@K": ...}, "markov": {...}}`` on ``rows`` (K in ``ks``, K <= beams)."""
    rows_df = _columns(rows, "split")
    if len(rows_df) == 0:
        raise ValueError("no rows to score")
    length = max([int(k) for k in ks if 0 < int(k) <= beams], default=0)
    if length == 0:
        return {"popularity": {}, "markov": {}}
    targets = rows_df["item_id"].to_numpy(dtype=np.int64)
    ranked = baseline_rankings(train, rows_df, catalogue, length)
    return {name: ranking_metrics(_ranks(lists, targets), ks, beams) for name, lists in ranked.items()}


def score_baselines_for(data_dir: str | Path, split: str, row_numbers: Sequence[int], ks: Sequence[int],
                        beams: int) -> dict[str, dict[str, float]]:
    """:func:`score_baselines` on rows ``row_numbers`` (0-based) of ``{split}.parquet`` in ``data_dir``,
    fitted on ``train.parquet``, ranked over ``items.parquet``: the rows the model was scored on."""
    from tsrec.data.schema import read_items, read_split

    rows = read_split(data_dir, split).take(np.asarray(list(row_numbers), dtype=np.int64))
    train = read_split(data_dir, "train")
    catalogue = read_items(data_dir).column("item_id").to_numpy()
    return score_baselines(train, rows, catalogue, ks, beams)
