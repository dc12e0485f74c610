"""``tsrec sid build``: item text -> embeddings -> residual k-means -> unique SIDs (METHOD.md 1.2-1.3).

    tsrec sid build --data runs/ind/data --out runs/ind/sids [--encoder DIR] [sid.collision=extra_level]

Inputs: ``<data>/items.parquet`` (:mod:`tsrec.data.schema`) and a local text encoder (``embed.encoder``;
default all-MiniLM-L6-v2), or embeddings computed by the caller (the Ray Data path,
:func:`tsrec.orchestration.embed.embed_items_ray`).

Outputs in ``--out`` (written through a staging folder, ``manifest.json`` last):

- ``index.json``: MiniOneRec format, item id string -> list of level tokens (``["<a_12>", "<b_3>", "<c_200>"]``).
- ``sids.parquet``: ``item_id`` int64, ``sid`` string (``<a_12><b_3><c_200>``), ``code_<l>`` int64 and
  ``token_<l>`` string per SID position.
- ``embeddings.npy``: (N, D) float32 item embeddings, row i = item i. Kept so SIDs can be rebuilt
  with other settings without re-embedding, and for later stages that cluster or inspect items.
- ``stats.json``: items, levels, codebook size (requested and used), distinct tokens and codebook
  utilisation per level, quantisation MSE per level, collisions before and after resolution.
- ``manifest.json``: resolved config, inputs (items file, encoder folder), library versions, seed.

Deterministic: the same items, encoder, config and seed give byte-identical ``index.json``,
``sids.parquet`` and ``stats.json`` (embedding on CPU with a fixed thread count; see
:mod:`tsrec.sid.rqkmeans` for the k-means side).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tsrec.artifacts import InputError, atomic_write_json, staging_dir, write_manifest, write_parquet
from tsrec.config import Config
from tsrec.data.schema import read_items
from tsrec.sid.collisions import collision_stats, resolve_collisions
from tsrec.sid.index import SidIndex, sid_stats, sids_table
from tsrec.sid.rqkmeans import fit_rqkmeans

OUTPUTS = ("index.json", "sids.parquet", "embeddings.npy", "stats.json")


def build_sids(cfg: Config, data_dir: Path, out_dir: Path, embeddings: np.ndarray | None = None) -> dict[str, Any]:
    """Build unique SIDs for every item of a prepared data folder and write them to ``out_dir``.

    Args:
        cfg: resolved config; reads ``embed`` (when embedding here), ``sid`` and ``run.seed``.
        data_dir: prepared data folder holding ``items.parquet``.
        out_dir: SID folder to (re)write.
        embeddings: (N, D) item embeddings in ``item_id`` order; ``None`` = embed in-process with
            :class:`tsrec.embed.TextEncoder`.

    Returns:
        The ``stats.json`` content plus ``timing_s`` (seconds per phase) and ``out_dir``.

    ``sid.method=import`` reads ``sid.index_file`` instead (:func:`tsrec.sid.imported.import_sids`).

    Raises:
        InputError: ``items.parquet`` is missing, malformed or has duplicate item ids.
        ValueError: ``embeddings`` does not have one row per item.
        CollisionError: ``sid.collision=reassign`` cannot make every SID unique.
    """
    from tsrec.sid.imported import check_config, import_sids

    check_config(cfg)
    if cfg.sid.method == "import":  # an existing index.json instead of k-means; embeddings are not used
        return import_sids(cfg, data_dir, out_dir)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    seed = cfg.sid.seed if cfg.sid.seed is not None else cfg.run.upstream_seed
    timing: dict[str, float] = {}

    # --- 1. items, in item_id order (row i of every output is item i) ---
    items_path = data_dir / "items.parquet"
    items = read_items(data_dir)
    items = items.sort_by("item_id")
    item_ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    if len(item_ids) == 0:
        raise InputError(items_path, "no items")
    dup = item_ids[1:][item_ids[1:] == item_ids[:-1]]
    if len(dup):
        raise InputError(items_path, f"item id {int(dup[0])} appears more than once", field="item_id")

    # --- 2. embeddings (METHOD.md 1.2) ---
    t0 = time.perf_counter()
    embedded_here = embeddings is None
    if embeddings is None:
        embeddings = embed_items(cfg, items)
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(item_ids):
        raise ValueError(f"embeddings have shape {embeddings.shape}; expected ({len(item_ids)}, D), one row per item")
    timing["embed"] = time.perf_counter() - t0

    # --- 3. residual k-means (METHOD.md 1.3) ---
    t0 = time.perf_counter()
    rq = fit_rqkmeans(embeddings, cfg.sid, seed)
    timing["kmeans"] = time.perf_counter() - t0

    # --- 4. collisions: every item gets a unique SID (METHOD.md R9) ---
    t0 = time.perf_counter()
    before = collision_stats(rq.codes)
    codes, moved = resolve_collisions(rq.codes, rq.last_residual, rq.centroids[-1], cfg.sid.collision)
    after = collision_stats(codes)
    if after["collision_groups"]:  # pragma: no cover - resolve_collisions guarantees uniqueness
        raise AssertionError(f"collisions left after resolution: {after}")
    timing["collisions"] = time.perf_counter() - t0

    # --- 5. artifacts ---
    index = SidIndex.from_codes(item_ids.tolist(), codes.tolist())
    stats = sid_stats(codes, rq.codebook_size, rq.requested_codebook_size, cfg.sid.levels)
    stats.update(
        {
            "embedding_dim": int(embeddings.shape[1]),
            "embeddings": "computed in-process" if embedded_here else "provided by caller",
            "collision_mode": cfg.sid.collision,
            "collisions_before": before,
            "collisions_after": after,
            "reassigned_items": int(moved),
            "quantisation_mse_per_level": [round(v, 6) for v in rq.mse_per_level],
            "vocab_tokens": len(index.all_tokens()),
            "seed": int(seed),
        }
    )
    with staging_dir(out_dir) as stage:
        atomic_write_json(stage / "index.json", index.to_json_obj(), indent=None)
        write_parquet(sids_table(item_ids, codes), stage / "sids.parquet")
        np.save(stage / "embeddings.npy", embeddings)
        atomic_write_json(stage / "stats.json", stats)
        write_manifest(
            stage,
            stage="sid",
            config=cfg,
            inputs={"items": items_path, "encoder": _encoder_path(cfg)},
            outputs=list(OUTPUTS),
            stats=stats,
            seed=seed,
        )
    return {**stats, "timing_s": {k: round(v, 3) for k, v in timing.items()}, "out_dir": str(out_dir)}


def embed_items(cfg: Config, items: pa.Table) -> np.ndarray:
    """Embed every row of ``items`` in-process with :class:`tsrec.embed.TextEncoder` (``cfg.embed``)."""
    from tsrec.embed import TextEncoder, encoder_kwargs, item_texts

    encoder = TextEncoder(**encoder_kwargs(cfg.embed))
    return encoder.encode(item_texts(items, cfg.embed.text))  # (N, D)


def _encoder_path(cfg: Config) -> str:
    if cfg.embed.encoder:
        return cfg.embed.encoder
    from tsrec.pretrained import default_encoder_path

    return str(default_encoder_path())


def read_stats(sids_dir: str | Path) -> dict[str, Any]:
    """``stats.json`` of a SID folder."""
    path = Path(sids_dir) / "stats.json"
    if not path.exists():
        raise InputError(path, "missing; run `tsrec sid build` first")
    return json.loads(path.read_text(encoding="utf-8"))
