"""Streaming JSON-lines reading for raw Amazon files (``.json`` or ``.json.gz``), with named errors.

The fast path is pyarrow's block-wise JSON reader with an explicit schema: only the requested fields
are parsed, other fields are skipped, and memory stays at one block plus what the caller keeps. When
pyarrow rejects the file (or a required field is null), :func:`locate_bad_line` re-reads the file
line by line with the ``json`` module to name the first bad line and field in an :class:`InputError`.
That slow path runs only on the way to an error.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj

from tsrec.artifacts import InputError

# Large enough for the longest real meta line (a few hundred KB); a JSON object must fit in one block.
BLOCK_BYTES = 16 << 20


def _open_stream(path: Path) -> pa.NativeFile:
    compression = "gzip" if path.suffix == ".gz" else None
    return pa.input_stream(str(path), compression=compression)


def iter_json_batches(path: Path, fields: dict[str, pa.DataType], required: tuple[str, ...] = ()) -> Iterator[pa.RecordBatch]:
    """Yield record batches holding ``fields`` (in order) of every JSON line of ``path``.

    Args:
        path: a JSON-lines file, optionally gzip-compressed (``.gz``).
        fields: field name -> Arrow type; absent fields read as null, unknown fields are ignored.
        required: fields that must be present and non-null on every line.

    Raises:
        InputError: empty file, malformed JSON, a non-UTF-8 byte, a wrong field type or a missing
            required field; the message names the file, the line and the field.
    """
    schema = pa.schema(list(fields.items()))
    options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    rows = 0
    try:
        reader = pj.open_json(_open_stream(path), read_options=pj.ReadOptions(block_size=BLOCK_BYTES), parse_options=options)
        for batch in reader:
            batch.validate(full=True)  # the JSON reader does not check UTF-8 inside strings; this does
            for name in required:
                if batch.column(name).null_count:
                    locate_bad_line(path, fields, required)
                    raise InputError(path, "missing required field", field=name)
            rows += batch.num_rows
            yield batch
    except (pa.ArrowInvalid, UnicodeDecodeError, OSError, zlib.error) as e:
        locate_bad_line(path, fields, required)
        raise InputError(path, f"unreadable JSON lines: {e}") from None
    if rows == 0:
        raise InputError(path, "empty file: no JSON records")


def locate_bad_line(path: Path, fields: dict[str, pa.DataType], required: tuple[str, ...]) -> None:
    """Scan ``path`` line by line and raise :class:`InputError` at the first bad line.

    Returns normally only when every line is fine (the caller then reports the original error).
    """
    seen = 0
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                seen += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(path, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})", row=lineno, field=_field_at(raw[: e.start].decode("utf-8", "replace"))) from None
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    hint = " (looks like a Python dict literal; only strict JSON lines are supported)" if text.lstrip().startswith("{'") else ""
                    raise InputError(path, f"malformed JSON at column {e.colno}: {e.msg}{hint}", row=lineno, field=_field_at(text[: e.pos])) from None
                if not isinstance(record, dict):
                    raise InputError(path, f"expected a JSON object, got {type(record).__name__}", row=lineno)
                for name, dtype in fields.items():
                    value = record.get(name)
                    if value is None:
                        if name in required:
                            raise InputError(path, "missing required field", row=lineno, field=name)
                        continue
                    if not _matches(value, dtype):
                        raise InputError(path, f"expected {dtype}, got {type(value).__name__} {str(value)[:60]!r}", row=lineno, field=name)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(path, f"unreadable file: {e}") from None
    if seen == 0:
        raise InputError(path, "empty file: no JSON records")


def _matches(value: object, dtype: pa.DataType) -> bool:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return isinstance(value, str)
    if pa.types.is_integer(dtype):
        return isinstance(value, int) and not isinstance(value, bool)
    if pa.types.is_floating(dtype):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_list(dtype):
        return isinstance(value, list) and all(v is None or _matches(v, dtype.value_type) for v in value)
    return True


_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


def _field_at(prefix: str) -> str | None:
    """The last object key before a parse error: the field whose value is broken (best effort)."""
    keys = _KEY.findall(prefix)
    return keys[-1] if keys else None
