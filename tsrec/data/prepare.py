"""``tsrec data prepare``: any source -> the internal data format (METHOD.md 1.1; tsrec/data/schema.py).

Sources, chosen by ``data.source``: ``amazon2018`` (raw review + meta JSON lines), ``minionerec`` (a
processed MiniOneRec folder such as ``../shared/data/amazon/Industrial_and_Scientific``) and
``synthetic`` (generated from ``run.seed``). Outputs in ``out_dir``: ``items.parquet``,
``train.parquet``, ``valid.parquet``, ``test.parquet`` and, last, ``manifest.json`` (resolved config,
inputs, versions, seed, stats). Command::

    tsrec data prepare --source minionerec --input ../shared/data/amazon/Industrial_and_Scientific --out runs/ind/data
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tsrec.artifacts import staging_dir, write_manifest, write_parquet
from tsrec.config import Config, ConfigError, DataConfig
from tsrec.data.amazon2018 import load_amazon2018
from tsrec.data.minionerec import load_minionerec
from tsrec.data.samples import SourceData
from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA, SPLITS
from tsrec.data.synthetic import generate_synthetic

# data.source -> reader(data config, seed) -> SourceData
SOURCES: dict[str, Callable[[DataConfig, int], SourceData]] = {
    "amazon2018": load_amazon2018,
    "minionerec": load_minionerec,
    "synthetic": generate_synthetic,
}


def prepare_data(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """Read the configured source and write the data folder atomically (manifest last).

    Args:
        cfg: the full config; reads ``data`` and ``run.seed`` (the seed matters for ``synthetic`` only).
        out_dir: the data folder to (re)write.

    Returns:
        Stats: ``source``, ``items``, ``users`` (distinct over all splits), ``rows`` per split,
        ``skipped`` (reason -> dropped rows) and source-specific entries.

    Raises:
        InputError: bad input, naming file, line and field. ConfigError: unknown source or bad values.
    """
    if cfg.data.source not in SOURCES:
        raise ConfigError(f"data.source: {cfg.data.source!r} is not one of {sorted(SOURCES)}")
    if cfg.data.source != "synthetic" and not cfg.data.input:
        raise ConfigError(f"data.input: required for source {cfg.data.source!r} (--input DIR)")

    # --- 1. read and validate (no output is touched before this succeeds) ---
    data = SOURCES[cfg.data.source](cfg.data, cfg.run.upstream_seed)
    items = _check_items(data.items)
    splits = {s: data.splits[s].cast(SAMPLES_SCHEMA) for s in SPLITS}

    # --- 2. stats ---
    users = set()
    for table in splits.values():
        users.update(table.column("user_id").unique().to_pylist())
    stats: dict[str, Any] = {
        "source": cfg.data.source,
        "items": items.num_rows,
        "users": len(users),
        "rows": {s: splits[s].num_rows for s in SPLITS},
        **data.stats,
    }
    stats.setdefault("skipped", {})

    # --- 3. write: parquet files, manifest last ---
    outputs = ["items.parquet"] + [f"{s}.parquet" for s in SPLITS]
    with staging_dir(out_dir) as stage:
        write_parquet(items, stage / "items.parquet")
        for s in SPLITS:
            write_parquet(splits[s], stage / f"{s}.parquet")
        write_manifest(stage, "data", cfg, inputs=data.inputs, outputs=outputs, stats=stats, seed=cfg.run.upstream_seed)
    return stats


def _check_items(items: pa.Table) -> pa.Table:
    """Required columns first with their contract types; ids dense 0..N-1 (a source bug otherwise)."""
    for f in ITEMS_SCHEMA:
        if f.name not in items.column_names:
            raise AssertionError(f"source produced items without column {f.name!r}")
    ids = items.column("item_id").to_numpy()
    if not np.array_equal(ids, np.arange(len(ids))):
        raise AssertionError("source produced non-dense item ids")
    rest = [c for c in items.column_names if c not in ITEMS_SCHEMA.names]
    return items.select(ITEMS_SCHEMA.names + rest).cast(pa.schema(list(ITEMS_SCHEMA) + [items.schema.field(c) for c in rest]))
