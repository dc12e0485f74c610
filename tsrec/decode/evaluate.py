"""Evaluation core: constrained beam search over the catalogue, HR@K / NDCG@K (METHOD.md 1.8, R1, R10).

Stage: ``tsrec eval`` (orchestrated by :mod:`tsrec.orchestration.evaluate`, which shards rows over Ray
actors). This module imports no Ray.

Inputs: a model folder (HF causal LM + tokenizer with the SID tokens), a data folder
(``{split}.parquet``: ``user_id``, ``history_item_ids``, ``item_id``), a sids folder (``index.json``).
Outputs (``write_results``): ``rankings.parquet`` (one row per evaluated row: prompt text, target
SID, ranked SIDs and their scores, first-hit rank), ``metrics.json`` and ``manifest.json``.

Prompts come from the one prompt builder: ``prompts.next_sid(history SIDs, mode=cfg.prompts.mode,
stage="eval")`` tokenised with ``prompts.encode_prompt``, left-padded with pad = EOS. Rows are decoded
in row order in fixed batches of ``cfg.eval.batch_size`` (the batch size is part of the parity
configuration under left padding, R10); the orchestrator cuts shards on batch boundaries, so results
do not depend on the number of workers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tsrec import prompts
from tsrec.artifacts import InputError, atomic_write_json, staging_dir, write_manifest, write_parquet
from tsrec.config import Config
from tsrec.decode.metrics import first_hit_rank, invalid_count, ranking_metrics
from tsrec.sid.index import SidIndex, read_index

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_rows(cfg: Config, data_dir: str | Path, sids_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The rows of ``cfg.eval.split`` (first ``cfg.eval.max_rows`` if > 0) as plain dicts with their row number.

    With ``sids_dir``, every history and target item is checked to have a SID (InputError naming the
    split file, 1-based row and field otherwise), before any model is loaded.
    """
    from tsrec.data.schema import read_split

    table = read_split(data_dir, cfg.eval.split)
    path = Path(data_dir) / f"{cfg.eval.split}.parquet"
    for name in ("user_id", "history_item_ids", "item_id"):
        if name not in table.column_names:
            raise InputError(path, "missing column", field=name)
    if cfg.eval.max_rows > 0:
        table = table.slice(0, cfg.eval.max_rows)
    users = table.column("user_id").to_pylist()
    hists = table.column("history_item_ids").to_pylist()
    items = table.column("item_id").to_pylist()
    rows = [
        {"row": i, "user_id": str(u), "history_item_ids": list(h or []), "item_id": int(t)}
        for i, (u, h, t) in enumerate(zip(users, hists, items))
    ]
    if sids_dir is not None:
        build_prompt_texts(rows, read_index(sids_dir), cfg.prompts.mode, source=str(path))
    return rows


def build_prompt_texts(rows: list[dict[str, Any]], index: SidIndex, mode: str, source: str = "split") -> list[dict[str, Any]]:
    """Attach ``prompt`` (text) and ``target_sid`` to each row; unknown item ids raise InputError."""
    sids = index.sids()
    out = []
    for r in rows:
        missing = [i for i in [*r["history_item_ids"], r["item_id"]] if i not in sids]
        if missing:
            raise InputError(source, f"item id {missing[0]} has no SID in the index", row=r["row"] + 1,
                             field="item_id" if missing[0] == r["item_id"] else "history_item_ids")
        sample = prompts.next_sid([sids[i] for i in r["history_item_ids"]], mode=mode, stage="eval")
        out.append({**r, "prompt": sample.prompt, "target_sid": sids[r["item_id"]], "_sample": sample})
    return out


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_model(model_dir: str | Path, dtype: str, device: str):
    """``(model, tokenizer)`` from a HF folder, eval mode, on ``device``; generation config is never used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[dtype]))
    return model.to(device).eval(), tok


def evaluate_shard(cfg: Config, model_dir: str | Path, sids_dir: str | Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decode one contiguous shard of rows; returns one result dict per row, in row order.

    Each result: ``row, user_id, item_id, prompt, target_sid, ranked_sids, scores, hit_rank``
    (``hit_rank`` -1 = miss), plus ``empty_events`` (live beams with an empty allowed set: 0).
    """
    import torch

    from tsrec.decode.beam import constrained_beam_search, left_pad
    from tsrec.decode.constraints import SidConstraints

    if not rows:
        return []
    torch.manual_seed(cfg.run.seed)  # nothing is sampled; fixed anyway so any future randomness is seeded
    device = resolve_device(cfg.eval.device)
    model, tok = load_model(model_dir, cfg.eval.dtype, device)
    if tok.eos_token_id is None:
        raise InputError(model_dir, "tokenizer has no EOS token (used as the left-padding id)")
    index = read_index(sids_dir)
    constraints = SidConstraints.from_index(index, tok, source=str(sids_dir)).to(device)
    prepared = build_prompt_texts(rows, index, cfg.prompts.mode, source=f"{cfg.eval.split}.parquet")
    results = []
    bs = cfg.eval.batch_size
    for start in range(0, len(prepared), bs):
        batch = prepared[start : start + bs]
        ids, mask = left_pad([prompts.encode_prompt(tok, r["_sample"]) for r in batch], tok.eos_token_id, device)
        out = constrained_beam_search(model, ids, mask, constraints, cfg.eval.beams, on_empty="count")
        ranked = out.sid_strings(constraints)
        scores = out.scores.float().cpu().tolist()
        for r, sids, sc, empty in zip(batch, ranked, scores, out.empty_events.tolist()):
            hit = first_hit_rank(sids, r["target_sid"])
            results.append({
                "row": r["row"], "user_id": r["user_id"], "item_id": r["item_id"], "prompt": r["prompt"],
                "target_sid": r["target_sid"], "ranked_sids": sids, "scores": sc,
                "hit_rank": -1 if hit is None else hit, "empty_events": empty,
            })
    return results


def compute_metrics(cfg: Config, results: list[dict[str, Any]], valid_sids: set[str]) -> dict[str, Any]:
    """HR@K / NDCG@K for K in ``cfg.eval.ks`` (K <= beams), the invalid-SID count and the run settings."""
    ranks = [None if r["hit_rank"] < 0 else r["hit_rank"] for r in results]
    return {
        **ranking_metrics(ranks, cfg.eval.ks, cfg.eval.beams),
        "invalid_sids": invalid_count([r["ranked_sids"] for r in results], valid_sids),
        "empty_allowed_events": sum(r["empty_events"] for r in results),
        "rows": len(results),
        "split": cfg.eval.split,
        "beams": cfg.eval.beams,
        "batch_size": cfg.eval.batch_size,
        "dtype": cfg.eval.dtype,
        "prompt_mode": cfg.prompts.mode,
    }


def write_results(cfg: Config, results: list[dict[str, Any]], out_dir: str | Path, inputs: dict[str, Path],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``rankings.parquet``, ``metrics.json`` and the manifest; returns metrics + ``extra``.

    ``metrics.json`` holds only what the decode determines (no timings, no worker count), so it is
    byte-identical across reruns and shardings; ``extra`` goes to the manifest stats and the return value.

    Raises:
        RuntimeError: a returned SID is not in the catalogue (after writing, so the run can be inspected).
    """
    import pyarrow as pa

    index = read_index(inputs["sids"])
    metrics = compute_metrics(cfg, results, set(index.sids().values()))
    table = pa.table({
        "row": pa.array([r["row"] for r in results], pa.int64()),
        "user_id": pa.array([r["user_id"] for r in results], pa.string()),
        "item_id": pa.array([r["item_id"] for r in results], pa.int64()),
        "prompt": pa.array([r["prompt"] for r in results], pa.string()),
        "target_sid": pa.array([r["target_sid"] for r in results], pa.string()),
        "ranked_sids": pa.array([r["ranked_sids"] for r in results], pa.list_(pa.string())),
        "scores": pa.array([r["scores"] for r in results], pa.list_(pa.float32())),
        "hit_rank": pa.array([r["hit_rank"] for r in results], pa.int64()),
    })
    with staging_dir(out_dir) as stage:
        write_parquet(table, stage / "rankings.parquet")
        atomic_write_json(stage / "metrics.json", metrics)
        write_manifest(stage, "eval", cfg, inputs=inputs, outputs=["rankings.parquet", "metrics.json"],
                       stats={**metrics, **(extra or {})}, seed=cfg.run.seed)
    if metrics["invalid_sids"]:
        raise RuntimeError(f"{metrics['invalid_sids']} returned SIDs are not catalogue SIDs (must be 0); see {out_dir}")
    return {**metrics, **(extra or {}), "out_dir": str(out_dir)}


def evaluate_local(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The whole evaluation in this process (no Ray): load rows, decode, write."""
    t0 = time.perf_counter()
    results = evaluate_shard(cfg, model_dir, sids_dir, load_rows(cfg, data_dir, sids_dir))
    inputs = {"model": model_dir, "data": data_dir, "sids": sids_dir}
    return write_results(cfg, results, out_dir, inputs, {"workers": 1, "seconds": round(time.perf_counter() - t0, 2)})
