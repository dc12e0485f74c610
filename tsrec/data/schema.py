"""The internal data format every stage after ``tsrec data prepare`` reads.

A data folder holds:
- ``items.parquet``: ``item_id`` int64 (0..N-1, dense), ``title`` str, ``description`` str, plus what
  the source has (``brand``, ``category``, ``sid`` for MiniOneRec sources, ...).
- ``train.parquet``, ``valid.parquet``, ``test.parquet``: ``user_id`` str, ``history_item_ids``
  list<int64> (oldest first, at most ``max_history``), ``item_id`` int64, and ``timestamp`` int64
  (target time, seconds; -1 where the source has none). Rows are in target-time order.
- ``manifest.json`` (written last).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tsrec.artifacts import InputError

SPLITS = ("train", "valid", "test")

ITEMS_SCHEMA = pa.schema([("item_id", pa.int64()), ("title", pa.string()), ("description", pa.string())])
SAMPLES_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("history_item_ids", pa.list_(pa.int64())),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
    ]
)


@dataclass
class Dataset:
    """An in-memory view of a prepared data folder."""

    items: pa.Table
    splits: dict[str, pa.Table]

    @property
    def num_items(self) -> int:
        return self.items.num_rows

    def titles(self) -> list[str]:
        return self.items.column("title").to_pylist()


def read_items(data_dir: str | Path) -> pa.Table:
    path = Path(data_dir) / "items.parquet"
    if not path.exists():
        raise InputError(path, "missing; run `tsrec data prepare` first")
    table = pq.read_table(path)
    for name in ITEMS_SCHEMA.names:
        if name not in table.column_names:
            raise InputError(path, "missing column", field=name)
    return table


def read_split(data_dir: str | Path, split: str) -> pa.Table:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    path = Path(data_dir) / f"{split}.parquet"
    if not path.exists():
        raise InputError(path, "missing; run `tsrec data prepare` first")
    return pq.read_table(path)


def read_dataset(data_dir: str | Path) -> Dataset:
    return Dataset(read_items(data_dir), {s: read_split(data_dir, s) for s in SPLITS})


def split_rows(table) -> list[tuple[list[int], int]]:
    """``(history item ids, target item id)`` per row of a split table (SFT and RL read splits alike)."""
    return list(zip(table.column("history_item_ids").to_pylist(), table.column("item_id").to_pylist()))


def item_sid(index, item_id: int, source: Path, row: int) -> str:
    """The SID of ``item_id``; an item missing from the index is an ``InputError`` naming the file and row."""
    try:
        return index.sid(item_id)
    except KeyError:
        raise InputError(source, f"item {item_id} has no SID in the index", row=row, field="item_id") from None
