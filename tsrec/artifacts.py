"""Artifacts: atomic writes, manifests and named input errors.

Every stage writes its outputs under a temporary name and renames them into place, so an interrupted
stage never leaves a file that looks complete. A stage folder is complete when its ``manifest.json``
exists; the manifest is written last and records the resolved config, the inputs (with sizes and
modification times), library versions, the seed and the files produced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class InputError(ValueError):
    """Bad input data. The message names the file, the row (1-based line) and the field."""

    def __init__(self, file: str | Path, message: str, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field = str(file), row, field
        where = self.file
        if row is not None:
            where += f", line {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    # Read it without setting it where possible: os.umask(0) briefly changes it for every thread.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_parquet(table: Any, path: str | Path) -> None:
    """Write a pyarrow Table (or pandas DataFrame) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


@contextlib.contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A fresh staging folder beside ``out_dir``; on success its files replace ``out_dir``'s.

    The old manifest is removed first, so a crash mid-way leaves ``out_dir`` without a manifest
    (incomplete) rather than a mix of old and new files that looks complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".staging", dir=out_dir.parent))
    try:
        yield stage
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST).unlink(missing_ok=True)
        manifest = stage / MANIFEST
        for item in sorted(stage.iterdir()):
            if item == manifest:
                continue
            dest = out_dir / item.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(item, dest)
        if manifest.exists():
            os.replace(manifest, out_dir / MANIFEST)  # last: marks the folder complete
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------

_VERSIONED = ("tsrec", "torch", "transformers", "faiss-cpu", "pyarrow", "numpy", "ray", "deepspeed", "peft")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe_input(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "bytes": st.st_size, "mtime": st.st_mtime}
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        h = hashlib.sha1()
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return {"path": str(p), "files": len(files), "listing_sha1": h.hexdigest()}
    return {"path": str(p), "missing": True}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(
    out_dir: str | Path,
    stage: str,
    config: Any,
    inputs: dict[str, str | Path] | None = None,
    outputs: list[str] | None = None,
    stats: dict[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` (last, atomically). ``config`` is a Config, a section or a dict."""
    import dataclasses

    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    out_dir = Path(out_dir)
    manifest = {
        "stage": stage,
        "created_unix": time.time(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": seed,
        "config": config,
        "inputs": {k: describe_input(v) for k, v in (inputs or {}).items()},
        "outputs": {name: file_sha256(out_dir / name) for name in (outputs or []) if (out_dir / name).is_file()},
        "stats": stats or {},
        "versions": library_versions(),
        "argv": sys.argv,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise InputError(path, "missing: the stage that writes this folder did not finish")
    return json.loads(path.read_text(encoding="utf-8"))


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; decoding and syntax errors become an :class:`InputError` naming file and line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON: {e.msg}", row=e.lineno) from None


def is_complete(out_dir: str | Path) -> bool:
    return (Path(out_dir) / MANIFEST).exists()
