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

import sys
import time
from pathlib import Path
from typing import Any

from tsrec import prompts
from tsrec.artifacts import InputError, atomic_write_json, staging_dir, write_manifest, write_parquet
from tsrec.config import Config
from tsrec.decode.metrics import first_hit_rank, invalid_count, ranking_metrics
from tsrec.sid.index import SidIndex, read_index, sid_string

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class SuffixScoringError(ValueError):
    """``eval.score_suffix`` was requested in canonical prompt mode, or the suffix ids cannot be derived."""


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


def resolve_dtype(name: str, device: str) -> str:
    """``auto``: bfloat16 on CUDA (the public evaluation's precision, METHOD.md 1.8), float32 elsewhere."""
    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return name


def score_suffix_enabled(cfg: Config) -> bool:
    """Whether ``\\n`` + EOS after the SID are scored: default on in upstream mode, never in canonical.

    Raises:
        SuffixScoringError: ``eval.score_suffix=true`` with ``prompts.mode=canonical`` (the canonical
        contract scores the SID tokens only).
    """
    flag = cfg.eval.score_suffix
    if cfg.prompts.mode != "upstream":
        if flag:
            raise SuffixScoringError("eval.score_suffix=true needs prompts.mode=upstream (canonical scores the SID only)")
        return False
    return True if flag is None else bool(flag)


def upstream_suffix_ids(tok, constraints) -> list[int]:
    """The ids the public trie forces after a SID: tokenise ``SID + "\\n"``, keep what follows the SID, add EOS.

    Derived by tokenising a real catalogue SID so that a tokenizer merging ``\\n`` differently is seen.

    Raises:
        SuffixScoringError: the SID's own ids are not a prefix of ``SID + "\\n"``'s ids, or no EOS.
    """
    sid_ids = constraints.sid_token_ids[0].tolist()
    ids = list(tok(constraints.sids[0] + "\n", add_special_tokens=False)["input_ids"])
    if ids[: len(sid_ids)] != sid_ids or len(ids) == len(sid_ids) or tok.eos_token_id is None:
        raise SuffixScoringError(f"cannot derive the upstream suffix ids: {constraints.sids[0]!r} + newline -> {ids}")
    return ids[len(sid_ids):] + [int(tok.eos_token_id)]


def load_model(model_dir: str | Path, dtype: str, device: str):
    """``(model, tokenizer)`` from a HF folder, eval mode, on ``device``; generation config is never used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, DTYPES[dtype]))
    return model.to(device).eval(), tok


def evaluate_shard(cfg: Config, model_dir: str | Path, sids_dir: str | Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decode one contiguous shard of rows; returns one result dict per row, in row order.

    Each result: ``row, user_id, item_id, prompt, target_sid, ranked_sids, scores, hit_rank``
    (``hit_rank`` -1 = miss), plus ``empty_events`` (live beams with an empty allowed set: 0),
    ``leaf_ok`` (per beam: decoded ids match the leaf's catalogue tuple) and ``dtype``.
    """
    import torch

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
    return decode_rows(cfg, model, tok, constraints, prepared, resolve_dtype(cfg.eval.dtype, device))


def decode_rows(cfg: Config, model, tok, constraints, prepared: list[dict[str, Any]], dtype: str) -> list[dict[str, Any]]:
    """Decode prepared rows (``build_prompt_texts``) in fixed batches with a loaded model and tables.

    Ranked SID strings are spelled from the **decoded token ids** (via the tokenizer), not looked up
    by leaf id, so a corrupt table shows up as an invalid SID (METHOD.md R10) instead of a plausible
    string; ``leaf_ok`` flags beams whose ids disagree with their leaf's catalogue tuple.
    """
    from tsrec.decode.beam import constrained_beam_search, left_pad

    device = constraints.device
    suffix = upstream_suffix_ids(tok, constraints) if score_suffix_enabled(cfg) else []
    results = []
    bs = cfg.eval.batch_size
    for start in range(0, len(prepared), bs):
        batch = prepared[start : start + bs]
        ids, mask = left_pad([prompts.encode_prompt(tok, r["_sample"]) for r in batch], tok.eos_token_id, device)
        out = constrained_beam_search(model, ids, mask, constraints, cfg.eval.beams, on_empty="count",
                                      score_suffix_ids=suffix)
        alive = (out.sid_index >= 0).tolist()
        ranked = [[sid_string(tok.convert_ids_to_tokens(beam)) if ok else "" for beam, ok in zip(row, live)]
                  for row, live in zip(out.sid_token_ids.tolist(), alive)]
        leaf_ok = constraints.leaf_matches(out.sid_token_ids, out.sid_index).tolist()
        scores = out.scores.float().cpu().tolist()
        for r, sids, sc, empty, ok in zip(batch, ranked, scores, out.empty_events.tolist(), leaf_ok):
            hit = first_hit_rank(sids, r["target_sid"])
            results.append({
                "row": r["row"], "user_id": r["user_id"], "item_id": r["item_id"], "prompt": r["prompt"],
                "target_sid": r["target_sid"], "ranked_sids": sids, "scores": sc,
                "hit_rank": -1 if hit is None else hit, "empty_events": empty, "leaf_ok": ok, "dtype": dtype,
            })
        if (start // bs + 1) % max(1, -(-len(prepared) // bs) // 5) == 0 or len(results) == len(prepared):
            # about five progress lines per shard (row numbers are the split's)
            print(f"eval: {len(results)}/{len(prepared)} rows decoded (rows {prepared[0]['row']}-{prepared[-1]['row']})",
                  file=sys.stderr, flush=True)
    return results


def compute_metrics(cfg: Config, results: list[dict[str, Any]], valid_sids: set[str]) -> dict[str, Any]:
    """HR@K / NDCG@K for K in ``cfg.eval.ks`` (K <= beams), the invalid-SID count and the run settings."""
    ranks = [None if r["hit_rank"] < 0 else r["hit_rank"] for r in results]
    return {
        **ranking_metrics(ranks, cfg.eval.ks, cfg.eval.beams),
        "invalid_sids": invalid_count([r["ranked_sids"] for r in results], valid_sids,
                                      [r.get("leaf_ok", [True] * len(r["ranked_sids"])) for r in results]),
        "empty_allowed_events": sum(r["empty_events"] for r in results),
        "rows": len(results),
        "split": cfg.eval.split,
        "beams": cfg.eval.beams,
        "batch_size": cfg.eval.batch_size,
        # the resolved precision(s) the rows were decoded in (``auto`` depends on the worker's device)
        "dtype": ",".join(sorted({r.get("dtype", cfg.eval.dtype) for r in results})) or cfg.eval.dtype,
        "prompt_mode": cfg.prompts.mode,
        "score_suffix": score_suffix_enabled(cfg),
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
    metrics["baselines"] = _baselines(cfg, results, inputs["data"], Path(out_dir))
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


def _baselines(cfg: Config, results: list[dict[str, Any]], data_dir: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Popularity and markov baselines on the same rows and metrics (:mod:`tsrec.decode.baselines`), and
    with ``eval.sasrec`` a SASRec trained here (:mod:`tsrec.decode.sasrec`, cached as ``out_dir/sasrec.json``).

    They are fitted on ``train.parquet``; a folder without one (not made by ``tsrec data prepare``)
    gets a stated reason instead of numbers, so the model's own evaluation still runs. Only metrics go
    into ``metrics.json`` (SASRec's settings and train time are in ``sasrec.json``), so it stays
    byte-identical across reruns.
    """
    from tsrec.decode.baselines import score_baselines_for

    if not results:
        return {}
    if not (Path(data_dir) / "train.parquet").exists():
        return {"skipped": f"no train.parquet in {data_dir}"}
    rows = [r["row"] for r in results]
    out = score_baselines_for(data_dir, cfg.eval.split, rows, cfg.eval.ks, cfg.eval.beams)
    if cfg.eval.sasrec:
        from tsrec.decode.sasrec import score_sasrec_for, settings_from

        out["sasrec"], _ = score_sasrec_for(data_dir, cfg.eval.split, rows, cfg.eval.ks, cfg.eval.beams,
                                            settings_from(cfg.eval, cfg.run.seed), cache_dir=out_dir)
    return out


def evaluate_local(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, out_dir: Path,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole evaluation in this process (no Ray): load rows, decode, write (``extra``: more manifest stats)."""
    import torch

    t0 = time.perf_counter()
    rows = load_rows(cfg, data_dir, sids_dir)
    threads = torch.get_num_threads()
    if resolve_device(cfg.eval.device) == "cpu":
        # Same intra-op thread count as a Ray eval actor (cpus_per_worker): CPU reductions round
        # differently with another thread count (seen: 2e-6 score differences), so 1 worker and N
        # workers would otherwise not write identical rankings.
        torch.set_num_threads(max(1, int(cfg.resources.eval.cpus_per_worker)))
    try:
        results = evaluate_shard(cfg, model_dir, sids_dir, rows)
    finally:
        torch.set_num_threads(threads)
    inputs = {"model": model_dir, "data": data_dir, "sids": sids_dir}
    return write_results(cfg, results, out_dir, inputs,
                         {"workers": 1, "seconds": round(time.perf_counter() - t0, 2), **(extra or {})})
