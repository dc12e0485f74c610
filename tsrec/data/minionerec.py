"""Stage 1.1 from an already-processed MiniOneRec dataset folder (METHOD.md 2.1, 2.3).

Input layout (``data.input``, e.g. ``../shared/data/amazon/Industrial_and_Scientific``)::

    index/{name}.item.json    item id -> {title, description (stringified Python list), brand, categories}
    index/{name}.index.json   item id -> [SID tokens]
    info/{name}_*.txt         SID<TAB>title<TAB>item_id, one line per item (checked against index.json)
    {train,valid,test}/*.csv  user_id,...,history_item_id,item_id,... (list columns are Python literals)

Outputs (via ``tsrec.data.prepare``): items.parquet with ``item_id, title, description,
description_raw, brand, sid`` (``sid`` = the joined tokens, so later stages can compare against the
released index) and the three splits, row for row as in the CSVs, ``timestamp`` = -1 (the CSVs carry
no time). Command: ``tsrec data prepare --source minionerec --input DIR --out DIR``.

A missing split CSV (Office_Products has no ``train/``) raises :class:`InputError` naming the missing
file, unless ``data.allow_missing_splits`` is true: then that split is written empty and listed in the
stats under ``missing_splits``.

``description`` is the stringified list parsed with ``ast.literal_eval`` and its elements joined by a
space; 16 Industrial descriptions are not valid literals (upstream HTML-unescaping unbalanced their
quotes) and are split on the quote-comma-quote separators instead (counted as ``description_unparsed``).
The raw string is kept in ``description_raw``.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from tsrec.artifacts import InputError
from tsrec.config import DataConfig
from tsrec.data.samples import SourceData, empty_samples
from tsrec.data.schema import SAMPLES_SCHEMA, SPLITS

CSV_COLUMNS = ("user_id", "history_item_id", "item_id")


def load_minionerec(cfg: DataConfig, seed: int) -> SourceData:
    """Read a MiniOneRec dataset folder into the internal format.

    Args:
        cfg: the ``data`` section (input, category, allow_missing_splits, max_history).
        seed: unused; kept for the common source signature.

    Raises:
        InputError: a missing/empty/non-UTF-8 file, an unknown item id in a history or target, a
            malformed list literal, or index/info disagreeing; names the file, line and field.
    """
    folder = Path(cfg.input)
    if not folder.is_dir():
        raise InputError(folder, "input folder not found (set data.input / --input)")
    name = cfg.category or _infer_name(folder)
    item_path = folder / "index" / f"{name}.item.json"
    index_path = folder / "index" / f"{name}.index.json"

    # --- catalogue: item.json + index.json, checked against info/*.txt ---
    items_raw = _load_json_object(item_path)
    sids_raw = _load_json_object(index_path)
    n_items = len(items_raw)
    _check_dense_ids(item_path, items_raw)
    if set(sids_raw) != set(items_raw):
        extra = sorted(set(sids_raw) ^ set(items_raw), key=lambda k: (len(k), k))[:5]
        raise InputError(index_path, f"item ids differ from {item_path.name}: {extra}", field="item_id")
    sids = ["".join(sids_raw[str(i)]) for i in range(n_items)]
    info_path = _check_info(folder, name, sids)
    items, unparsed = _items_table(item_path, items_raw, sids)

    # --- splits: histories and targets as in the CSVs, row for row ---
    splits, inputs, missing, truncated = {}, {"items": item_path, "index": index_path}, [], 0
    if info_path is not None:
        inputs["info"] = info_path
    for split in SPLITS:
        path = _split_file(folder, split, name)
        if path is None:
            if not cfg.allow_missing_splits:
                raise InputError(folder / split / f"{name}_5_*.csv", "missing split file; set data.allow_missing_splits=true to write it empty")
            splits[split] = empty_samples()
            missing.append(split)
            continue
        splits[split], cut = read_split_csv(path, n_items, sids, cfg.max_history)
        truncated += cut
        inputs[split] = path
    stats = {"description_unparsed": unparsed, "missing_splits": missing, "histories_truncated": truncated, "skipped": {}}
    return SourceData(items, splits, inputs, stats)


def read_split_csv(path: Path, n_items: int, sids: list[str], max_history: int) -> tuple[pa.Table, int]:
    """Read one split CSV; validate every id against the catalogue.

    Returns:
        (samples table with :data:`SAMPLES_SCHEMA`, number of histories cut to ``max_history``).
    """
    text = _read_utf8(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    for col in CSV_COLUMNS:
        if col not in header:
            raise InputError(path, f"missing column (header: {','.join(header)})", row=1, field=col)
    users, targets, offsets, values = [], [], [0], []
    check_sid = "item_sid" in header
    truncated = 0
    for row in reader:
        line = reader.line_num
        hist = _parse_id_list(path, line, row["history_item_id"])
        target = _parse_id(path, line, "item_id", row["item_id"])
        for value in hist:
            if not 0 <= value < n_items:
                raise InputError(path, f"unknown item id {value} (catalogue has ids 0..{n_items - 1})", row=line, field="history_item_id")
        if not 0 <= target < n_items:
            raise InputError(path, f"unknown item id {target} (catalogue has ids 0..{n_items - 1})", row=line, field="item_id")
        if check_sid and row["item_sid"] != sids[target]:
            raise InputError(path, f"{row['item_sid']!r} disagrees with index.json {sids[target]!r} for item {target}", row=line, field="item_sid")
        if len(hist) > max_history:
            hist, truncated = hist[-max_history:], truncated + 1
        users.append(row["user_id"])
        targets.append(target)
        values.extend(hist)
        offsets.append(len(values))
    if not users and not text.strip():
        raise InputError(path, "empty file")
    histories = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "history_item_ids": histories,
            "item_id": pa.array(targets, pa.int64()),
            "timestamp": pa.array(np.full(len(users), -1, dtype=np.int64)),
        },
        schema=SAMPLES_SCHEMA,
    )
    return table, truncated


def parse_description(raw: str) -> tuple[str, bool]:
    """Join the elements of a stringified Python list; returns (text, parsed_as_literal)."""
    raw = raw.strip()
    if not raw:
        return "", True
    try:
        value = ast.literal_eval(raw)  # literals only: never evaluates code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        value = None
    if isinstance(value, list):
        return " ".join(str(v).strip() for v in value if str(v).strip()), True
    if isinstance(value, str):
        return value.strip(), True
    # not a valid literal: split on the quote-comma-quote separators between elements
    body = raw[1:-1].strip() if raw.startswith("[") and raw.endswith("]") else raw
    if body[:1] in "'\"":
        body = body[1:]  # the opening quote of the first element
    if body[-1:] in "'\"":
        body = body[:-1]  # the closing quote of the last element
    parts = [p.strip() for p in _ELEMENT_SEP.split(body)]
    return " ".join(p for p in parts if p), False


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

_ELEMENT_SEP = re.compile(r"""['"]\s*,\s*['"]""")


def _infer_name(folder: Path) -> str:
    names = sorted(p.name[: -len(".item.json")] for p in (folder / "index").glob("*.item.json"))
    if len(names) != 1:
        raise InputError(folder / "index", f"expected one *.item.json, found {names}; set data.category / --category")
    return names[0]


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise InputError(path, "missing file")
    data = path.read_bytes()
    if not data.strip():
        raise InputError(path, "empty file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        field = None
        if path.suffix == ".csv":  # name the CSV column by counting separators before the bad byte
            header = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip().split(",")
            prefix = data[data.rfind(b"\n", 0, e.start) + 1 : e.start].decode("utf-8", "replace")
            ncol = next(csv.reader([prefix + "x"]), [""])
            field = header[min(len(ncol) - 1, len(header) - 1)] if header else None
        raise InputError(path, f"not UTF-8 (byte {data[e.start]:#04x} at column {col})", row=line, field=field) from None


def _load_json_object(path: Path) -> dict:
    text = _read_utf8(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON at column {e.colno}: {e.msg}", row=e.lineno) from None
    if not isinstance(obj, dict):
        raise InputError(path, f"expected a JSON object keyed by item id, got {type(obj).__name__}")
    return obj


def _check_dense_ids(path: Path, obj: dict) -> None:
    if sorted(obj, key=lambda k: (len(k), k)) != [str(i) for i in range(len(obj))]:
        bad = next((k for k in obj if not k.isdigit() or int(k) >= len(obj)), None)
        raise InputError(path, f"item ids must be 0..{len(obj) - 1} without gaps (offending key {bad!r})", field="item_id")


def _check_info(folder: Path, name: str, sids: list[str]) -> Path | None:
    """info/*.txt must list every item with the index's SID; it is optional (index.json is the source)."""
    files = sorted((folder / "info").glob(f"{name}*.txt"))
    if not files:
        return None
    path = files[0]
    lines = [line for line in _read_utf8(path).split("\n") if line]
    if len(lines) != len(sids):
        raise InputError(path, f"{len(lines)} lines for {len(sids)} items in index.json")
    for lineno, line in enumerate(lines, start=1):
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2].isdigit():
            raise InputError(path, "expected SID<TAB>title<TAB>item_id", row=lineno, field="item_id")
        item = int(parts[2])
        if item >= len(sids) or parts[0] != sids[item]:
            raise InputError(path, f"SID {parts[0]!r} disagrees with index.json for item {item}", row=lineno, field="sid")
    return path


def _items_table(path: Path, raw: dict, sids: list[str]) -> tuple[pa.Table, int]:
    cols: dict[str, list[str]] = {"title": [], "description": [], "description_raw": [], "brand": []}
    unparsed = 0
    for i in range(len(raw)):
        rec = raw[str(i)]
        title = rec.get("title") if isinstance(rec, dict) else None
        if not isinstance(title, str) or not title.strip():
            raise InputError(path, f"item {i} has no title", field="title")
        desc_raw = rec.get("description") or ""
        if not isinstance(desc_raw, str):
            desc_raw = str(desc_raw)
        desc, ok = parse_description(desc_raw)
        unparsed += not ok
        cols["title"].append(title)
        cols["description"].append(desc)
        cols["description_raw"].append(desc_raw)
        cols["brand"].append(str(rec.get("brand") or ""))
    table = pa.table(
        {
            "item_id": pa.array(np.arange(len(raw)), pa.int64()),
            **{k: pa.array(v, pa.string()) for k, v in cols.items()},
            "sid": pa.array(sids, pa.string()),
        }
    )
    return table, unparsed


def _split_file(folder: Path, split: str, name: str) -> Path | None:
    preferred = sorted((folder / split).glob(f"{name}_5_*.csv"))
    candidates = preferred or sorted((folder / split).glob("*.csv"))
    if len(candidates) > 1:
        raise InputError(folder / split, f"several CSVs {[p.name for p in candidates]}; cannot tell which is the {split} split")
    return candidates[0] if candidates else None


def _parse_id(path: Path, line: int, field: str, text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise InputError(path, f"expected an integer item id, got {text!r}", row=line, field=field) from None


def _parse_id_list(path: Path, line: int, text: str) -> list[int]:
    try:
        value = json.loads(text)  # a Python list of ints is also valid JSON
    except (TypeError, json.JSONDecodeError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise InputError(path, f"expected a list of integer item ids like [1, 2], got {str(text)[:60]!r}", row=line, field="history_item_id")
    return value
