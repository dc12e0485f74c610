"""Sweep identity: which Tune experiment a ``tsrec tune`` command continues, and which model init a trial uses.

The identity of a sweep is a hash of what decides its trials' results: the resolved config the trials start
from (the space, scheduler, search settings, metric and every section a trial reads) minus
:data:`NON_IDENTITY_KEYS` (where outputs go, what happens after the trials), plus a fingerprint of each
shared upstream folder (data, sids, semantics). The Tune experiment lives in ``<tune>/ray/sweep-<identity>``
(``<tune.storage_path>/ray/sweep-<identity>`` when set; where it lives is not part of the identity):
the same command restores it, a changed space, base config or upstream starts a new experiment there
(the old one stays in its own folder, its outputs are not mixed in). ``<tune>/sweep.json`` records the
identity of the sweep the outputs in ``<tune>/`` belong to.

Fingerprints: a stage folder with a ``manifest.json`` -> the manifest's sha256 (rewritten whenever the
stage is rebuilt, untouched when it is skipped as up to date); a file -> its content sha256; anything
else -> ``tsrec.artifacts.describe_input`` (file sizes and mtimes) without the path.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

# Dotted config keys that do not change what any trial computes: where the run, the sweep's outputs and its
# experiment and trial runs go (tune.storage_path, run.storage_endpoint: a restore looks there, see
# tsrec.orchestration.tune), its display name, what happens after the trials (export, test eval), how many trials
# run at once (a restored experiment keeps its own), and sections no trial reads (rl; resources.*: a trial's
# group is tune.resources).
NON_IDENTITY_KEYS = ("run.out_dir", "run.name", "run.storage_endpoint", "tune.dir", "tune.storage_path",
                     "tune.export_best", "tune.eval_test", "tune.max_concurrent_trials", "tune.resources.driver_cpus",
                     "sft.log_every_steps", "sft.max_failures", "rl", "resources", "eval.published")
# Shared upstream folders under run.out_dir (the pipeline's data, sid and semantics stages).
UPSTREAM_DIRS = ("data", "sids", "semantics")
TEACHER_FILE = Path("semantics") / "description_keywords.json"
EXPERIMENT_PREFIX = "sweep-"


def fingerprint(path: str | Path | None) -> dict[str, Any] | None:
    """What identifies one input's content (not its path, so a moved run folder is the same); None if absent."""
    from tsrec.artifacts import MANIFEST, describe_input, file_sha256

    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and (p / MANIFEST).is_file():
        return {"manifest_sha256": file_sha256(p / MANIFEST)}
    if p.is_file():
        return {"sha256": file_sha256(p)}
    if not p.exists():
        return None
    return {k: v for k, v in describe_input(p).items() if k != "path"}


def upstream_fingerprints(root: str | Path) -> dict[str, Any]:
    """Fingerprints of the shared upstream folders under ``root`` and of the teacher file in semantics."""
    root = Path(root)
    out: dict[str, Any] = {name: fingerprint(root / name) for name in UPSTREAM_DIRS}
    out["teacher_file"] = fingerprint(root / TEACHER_FILE)
    return out


def _drop(raw: dict[str, Any], dotted: str) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)


def identity_payload(base: dict[str, Any], fingerprints: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able object :func:`sweep_identity` hashes (also written to ``sweep.json`` to read back)."""
    cfg = copy.deepcopy(base)
    for key in NON_IDENTITY_KEYS:
        _drop(cfg, key)
    return {"config": cfg, "inputs": fingerprints}


def sweep_identity(base: dict[str, Any], fingerprints: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of :func:`identity_payload` (keys sorted: dict order does not count)."""
    payload = identity_payload(base, fingerprints)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def experiment_dir(tune_dir: str | Path, identity: str) -> Path:
    """The Tune experiment folder of the sweep with ``identity``: ``<tune>/ray/sweep-<identity>``."""
    return Path(tune_dir) / "ray" / f"{EXPERIMENT_PREFIX}{identity}"


def recorded_identity(tune_dir: str | Path) -> str | None:
    """The identity in ``<tune>/sweep.json`` (the sweep the outputs in ``<tune>`` belong to); None if none."""
    f = Path(tune_dir) / "sweep.json"
    try:
        return json.loads(f.read_text()).get("identity")
    except (OSError, ValueError):
        return None
