"""``sid.method: import``: an existing ``index.json`` as the SID stage (METHOD.md 1.3, R9).

    tsrec sid build --data runs/ind/data --out runs/ind/sids sid.method=import \\
        sid.index_file=../shared/data/amazon/Industrial_and_Scientific/index/Industrial_and_Scientific.index.json

Instead of embedding the items and running residual k-means, the SID stage reads a released index in
the MiniOneRec/TS-Rec format (``{"<item_id>": ["<a_12>", "<b_3>", "<c_200>"], ...}``), checks it against
the items of the data stage (and against the teacher file when ``teacher.engine: file``) and writes
the SID folder the later stages read: ``index.json`` (tsrec's serialisation of the same mapping),
``sids.parquet``, ``stats.json`` and ``manifest.json`` (last). There is no ``embeddings.npy``: nothing
was embedded. Every check runs on the driver before anything is written; no Ray worker is involved.

Checks (each an :class:`~tsrec.artifacts.InputError` naming the index file, or the teacher file, and
the first bad entry):

- the file: JSON object, not empty, no item id twice;
- entries: item ids are decimal integers without sign or leading zeros; each SID is a non-empty list
  of tokens ``<letter_int>`` (code without leading zeros); the letter of position ``l`` is
  ``LEVEL_PREFIXES[l]`` (``a, b, c``, then ``d`` for a collision level); every SID has the length of
  the first one;
- catalogue: every item of ``items.parquet`` has a SID, and the index has no item outside it;
- collisions (items sharing a full SID): ``sid.import_collisions=keep`` (default) keeps them as the
  released indices do (upstream handling, METHOD.md R9: the Industrial index has 15 groups, 31 items)
  and reports them in the stats; ``error`` stops at the first group;
- teacher file (``teacher.engine: file``): a record whose token no SID uses is an error (the file
  was written for another index); a SID token without a record is a warning, counted per level and
  within ``sa_init.depth`` (SA-Init leaves that row at the baseline init, as for a token the teacher
  failed on).

The SID folder's identity carries the imported file's content: ``stats.index_file_sha256`` in the
manifest, and :func:`import_fingerprints` (index file, and the teacher file it was checked against) in
the pipeline's stage hash, so an edited file at the same path reruns the SID stage and everything after it.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from tsrec.artifacts import InputError, atomic_write_json, file_sha256, staging_dir, write_manifest, write_parquet
from tsrec.config import Config, ConfigError
from tsrec.sid.collisions import collision_stats
from tsrec.sid.index import LEVEL_PREFIXES, SidIndex, sid_stats, sids_table

OUTPUTS = ("index.json", "sids.parquet", "stats.json")

# Any "<letter_int>" (the level letter is checked separately, so "<f_1>" is a level error, "<a1>" malformed).
_ANY_TOKEN_RE = re.compile(r"<([a-z])_(0|[1-9]\d*)>")
_ITEM_ID_RE = re.compile(r"0|[1-9]\d*")


def resolve_index_file(path: str | Path) -> Path:
    """The index file named by ``sid.index_file``: a file, or a folder holding exactly one
    ``index.json`` / ``*.index.json`` / ``index/*.index.json`` (as :func:`tsrec.sid.index.read_index` looks)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "index.json", *sorted(path.glob("*.index.json")), *sorted(path.glob("index/*.index.json"))]
        found = [c for c in candidates if c.is_file()]
        if len(found) != 1:
            raise InputError(path, "sid.index_file: expected exactly one index.json or *.index.json in this folder, "
                                   f"found {[str(f) for f in found] or 'none'}")
        return found[0]
    if not path.is_file():
        raise InputError(path, "sid.index_file: file not found")
    return path


def index_fingerprint(path: str | Path) -> str | None:
    """sha256 of the imported index file (None when it cannot be found: the stage then names the problem)."""
    try:
        return file_sha256(resolve_index_file(path))
    except (InputError, OSError):
        return None


def import_fingerprints(cfg: Config) -> dict[str, str | None]:
    """What an import's result depends on beyond the config: the index file's sha256 and, when the
    teacher check runs (``teacher.engine: file``), the teacher file's (None for a file not found)."""
    out = {"index_file": index_fingerprint(cfg.sid.index_file)}
    if cfg.teacher.engine == "file" and cfg.teacher.file:
        out["teacher_file"] = file_sha256(cfg.teacher.file) if Path(cfg.teacher.file).is_file() else None
    return out


def check_config(cfg: Config) -> None:
    """``sid.method`` and ``sid.index_file`` agree (ConfigError otherwise)."""
    if cfg.sid.method == "import" and not cfg.sid.index_file:
        raise ConfigError("sid.method=import needs sid.index_file (the index.json to import)")
    if cfg.sid.method != "import" and cfg.sid.index_file:
        raise ConfigError(f"sid.index_file is set but sid.method={cfg.sid.method!r}; set sid.method=import to use it "
                          "(or clear sid.index_file)")


def parse_index_file(path: Path) -> SidIndex:
    """Read and check an index file's format (every check of the module docstring up to the catalogue)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 ({e.reason} at byte {e.start})") from None

    def pairs(kv: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for k, _ in kv:
            if k in seen:
                raise InputError(path, f"item {k} appears more than once", field="item_id")
            seen.add(k)
        return dict(kv)

    try:
        raw = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON: {e.msg}", row=e.lineno) from None
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, "expected a non-empty JSON object item_id -> [SID tokens]")

    items: dict[int, list[str]] = {}
    length: int | None = None
    first_key = ""
    for key, toks in raw.items():
        if not _ITEM_ID_RE.fullmatch(key):
            raise InputError(path, f"item id {key!r} is not a non-negative decimal integer", field="item_id")
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) for t in toks):
            raise InputError(path, f"item {key}: expected a non-empty list of SID tokens like '<a_12>', got {toks!r}",
                             field="sid")
        for lvl, tok in enumerate(toks):
            m = _ANY_TOKEN_RE.fullmatch(tok)
            if m is None:
                raise InputError(path, f"item {key}: token {tok!r} is not a SID token '<letter_int>' like '<a_12>'",
                                 field="sid")
            if lvl >= len(LEVEL_PREFIXES):
                raise InputError(path, f"item {key}: {len(toks)} tokens; SIDs have at most {len(LEVEL_PREFIXES)} "
                                       f"levels ({', '.join(LEVEL_PREFIXES)})", field="sid")
            if m.group(1) != LEVEL_PREFIXES[lvl]:
                raise InputError(path, f"item {key}: token {tok} at position {lvl + 1}; position {lvl + 1} takes "
                                       f"'<{LEVEL_PREFIXES[lvl]}_*>' (levels in order {', '.join(LEVEL_PREFIXES)})",
                                 field="sid")
        if length is None:
            length, first_key = len(toks), key
        elif len(toks) != length:
            raise InputError(path, f"item {key}: {len(toks)} tokens {toks}, but item {first_key} has {length}; "
                                   "every SID must have the same length", field="sid")
        items[int(key)] = list(toks)
    return SidIndex(dict(sorted(items.items())))


def check_catalogue(index: SidIndex, item_ids: list[int], index_path: Path, items_path: Path) -> None:
    """Every catalogue item has a SID; the index names no item outside the catalogue."""
    catalogue = set(item_ids)
    missing = [i for i in sorted(catalogue) if i not in index.items]
    if missing:
        raise InputError(index_path, f"item {missing[0]} of the catalogue ({items_path}) has no SID "
                                     f"({len(missing)} of {len(catalogue)} catalogue items missing)", field="item_id")
    extra = [i for i in index.items if i not in catalogue]
    if extra:
        raise InputError(index_path, f"item {extra[0]} is not in the catalogue ({items_path}, {len(catalogue)} items); "
                                     f"{len(extra)} indexed items are outside it", field="item_id")


def codes_of(index: SidIndex) -> np.ndarray:
    """(N, L) int64 codes, rows in item id order (the index is checked: one length, canonical tokens)."""
    return np.array([[int(t[3:-1]) for t in toks] for toks in index.items.values()], dtype=np.int64).reshape(
        len(index.items), index.num_levels)


def collision_report(index: SidIndex, codes: np.ndarray) -> dict[str, Any]:
    """``collision_stats`` plus every group as item ids (first item order)."""
    by_sid: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for item, toks in index.items.items():
        by_sid[tuple(toks)].append(item)
    groups = sorted((g for g in by_sid.values() if len(g) > 1), key=lambda g: g[0])
    return {**collision_stats(codes), "groups": groups}


def check_collisions(report: dict[str, Any], index: SidIndex, mode: str, path: Path) -> None:
    if mode == "error" and report["groups"]:
        g = report["groups"][0]
        raise InputError(path, f"items {g} share the SID {index.sid(g[0])} ({report['collision_groups']} collision "
                               f"group(s), {report['collision_items']} items); sid.import_collisions=keep keeps them "
                               "(upstream handling, METHOD.md R9)", field="sid")


def check_teacher(index: SidIndex, teacher_file: str | Path, depth: int) -> dict[str, Any]:
    """Index tokens against a teacher file: an unused teacher token is an InputError, a SID token
    without a record a counted warning. Returns the counts (``warnings``: the lines printed)."""
    from tsrec.semantics.records import read_teacher_file

    records = read_teacher_file(teacher_file)  # InputError for a malformed file
    used = set(index.all_tokens())
    for n, rec in enumerate(records, start=1):
        if rec["token"] not in used:
            n_extra = sum(r["token"] not in used for r in records)
            raise InputError(teacher_file, f"record {n}: token {rec['token']} is used by no SID of the imported index "
                                           f"({n_extra} of {len(records)} records); the teacher file was written for "
                                           "another index", row=n, field="token")
    have = {r["token"] for r in records}
    by_level = index.tokens_by_level()
    missing_by_level = [[t for t in toks if t not in have] for toks in by_level]
    within = [t for lvl in range(min(depth, len(by_level))) for t in missing_by_level[lvl]]
    warnings = []
    if within:
        warnings.append(f"{len(within)} SID token(s) of the first sa_init.depth={depth} levels have no record in "
                        f"{teacher_file} (first: {within[0]}); SA-Init leaves them at the baseline init")
    beyond = [t for lvl in range(min(depth, len(by_level)), len(by_level)) for t in missing_by_level[lvl]]
    if beyond:
        warnings.append(f"{len(beyond)} SID token(s) beyond sa_init.depth={depth} have no record in {teacher_file} "
                        f"(first: {beyond[0]}); SA-Init does not use them, TS-Align has no sample for them")
    return {
        "file": str(teacher_file), "file_sha256": file_sha256(teacher_file), "records": len(records),
        "index_tokens": len(used), "extra_tokens": 0, "missing_tokens": sum(map(len, missing_by_level)),
        "missing_tokens_per_level": [len(m) for m in missing_by_level], "missing_within_depth": len(within),
        "depth": depth, "warnings": warnings,
    }


def import_sids(cfg: Config, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Import ``sid.index_file`` as the SID folder of the items in ``data_dir``.

    Returns:
        The ``stats.json`` content plus ``out_dir``.

    Raises:
        ConfigError: ``sid.method``/``sid.index_file`` disagree.
        InputError: any check of the module docstring; nothing is written then.
    """
    from tsrec.data.schema import read_items

    check_config(cfg)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    path = resolve_index_file(cfg.sid.index_file)
    sha = file_sha256(path)  # before parsing: the stats name the exact bytes that were checked

    # --- 1. the file on its own ---
    index = parse_index_file(path)
    codes = codes_of(index)

    # --- 2. against the catalogue of the data stage ---
    items_path = data_dir / "items.parquet"
    items = read_items(data_dir)
    item_ids = [int(i) for i in items.column("item_id").to_pylist()]
    dups = [i for i, n in Counter(item_ids).items() if n > 1]
    if dups:
        raise InputError(items_path, f"item id {dups[0]} appears more than once", field="item_id")
    check_catalogue(index, item_ids, path, items_path)

    # --- 3. collisions (R9) ---
    collisions = collision_report(index, codes)
    check_collisions(collisions, index, cfg.sid.import_collisions, path)

    # --- 4. against the teacher file ---
    teacher = None
    if cfg.teacher.engine == "file" and cfg.teacher.file:
        teacher = check_teacher(index, cfg.teacher.file, cfg.sa_init.depth)

    # The data stage's own SIDs (minionerec sources carry the released ones): reported, not enforced,
    # since importing another index over a MiniOneRec catalogue is legitimate.
    disagree = None
    if "sid" in items.column_names:
        data_sid = dict(zip(item_ids, items.column("sid").to_pylist()))
        disagree = [i for i in index.items if data_sid.get(i) not in (None, "") and data_sid[i] != index.sid(i)]

    # --- 5. stats and artifacts ---
    sizes = [int(codes[:, lvl].max()) + 1 for lvl in range(codes.shape[1])]
    stats = sid_stats(codes, max(sizes), max(sizes), codes.shape[1])
    warnings = list(teacher["warnings"]) if teacher else []
    if collisions["collision_groups"]:
        warnings.append(f"{collisions['collision_groups']} collision group(s), {collisions['collision_items']} items "
                        f"share a SID (largest group {collisions['largest_group']}); kept (sid.import_collisions=keep)")
    if disagree:
        warnings.append(f"{len(disagree)} item(s) have another SID in {items_path} (column sid) than in the imported "
                        f"index (first: item {disagree[0]})")
    stats.update({
        "method": "import",
        "index_file": str(path),
        "index_file_sha256": sha,
        "index_file_bytes": path.stat().st_size,
        # Largest code + 1 per level: the smallest codebook holding the codes (the real size is not in the file).
        "codebook_size_per_level": sizes,
        "vocab_tokens": len(index.all_tokens()),
        "import_collisions": cfg.sid.import_collisions,
        "collisions": {k: v for k, v in collisions.items() if k != "groups"},
        "collision_groups_items": collisions["groups"],
        "data_sid_disagreements": None if disagree is None else len(disagree),
        "teacher_check": None if teacher is None else {k: v for k, v in teacher.items() if k != "warnings"},
        "warnings": warnings,
    })
    for line in warnings:
        print(f"sid import: warning: {line}", file=sys.stderr, flush=True)

    item_arr = np.asarray(list(index.items), dtype=np.int64)
    inputs: dict[str, Any] = {"items": items_path, "index_file": path}
    if teacher is not None:
        inputs["teacher_file"] = cfg.teacher.file
    with staging_dir(out_dir) as stage:
        atomic_write_json(stage / "index.json", index.to_json_obj(), indent=None)
        write_parquet(sids_table(item_arr, codes), stage / "sids.parquet")
        atomic_write_json(stage / "stats.json", stats)
        write_manifest(stage, stage="sid", config=cfg, inputs=inputs, outputs=list(OUTPUTS), stats=stats,
                       seed=None)
    # A rerun into a folder last written by `sid build` must not keep that build's embeddings beside the import.
    (out_dir / "embeddings.npy").unlink(missing_ok=True)
    return {**stats, "out_dir": str(out_dir)}
