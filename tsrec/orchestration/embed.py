"""Item text embedding on a Ray Data actor pool (METHOD.md 1.2).

The core batch callable :class:`tsrec.embed.TextEncoder` runs as a ``map_batches`` stage with one model
load per actor; this module only decides *where* it runs (``resources.embed``: actors, CPUs and GPUs per
actor) and puts the rows back in ``item_id`` order. Used by ``tsrec run`` (stage ``sid``) and
``tsrec sid build --ray``; the result goes to :func:`tsrec.sid.build.build_sids` as ``embeddings``.

Batches are composed differently than in-process, so results match :meth:`TextEncoder.encode` up to
float rounding (masked pooling makes each row independent of its batch), not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
from tsrec.orchestration.cluster import DATA_ACTOR_POOL_ARGS, cpu_only_runtime_env, ensure_ray

from tsrec.config import Config
from tsrec.embed import TextEncoder, encoder_kwargs, item_texts


def embed_placement(gpus_per_worker: float, device: str) -> dict:
    """``{"device": ..., ["runtime_env": ...]}`` of the encoder actors from ``resources.embed.gpus_per_worker``.

    An actor with GPUs uses ``embed.device`` (``auto`` = its GPU). An actor with none decodes on CPU: ``auto``
    becomes ``cpu`` and the node's GPUs are hidden from it (Ray 2.60 would show it every GPU, and every actor
    of the pool would land on cuda:0 outside Ray's accounting); an explicit CUDA device there is an error.

    Raises:
        ValueError: ``embed.device`` is a CUDA device but the actors get no GPU.
    """
    if gpus_per_worker and gpus_per_worker > 0:
        return {"device": device}
    if device.startswith("cuda"):
        raise ValueError(f"embed.device={device} with resources.embed.gpus_per_worker=0: zero-GPU Ray actors would "
                         "all share a GPU Ray does not know they use; set resources.embed.gpus_per_worker or embed.device=cpu")
    return {"device": "cpu" if device == "auto" else device, "runtime_env": cpu_only_runtime_env()}


def embed_items_ray(cfg: Config, items: pa.Table) -> np.ndarray:
    """Embed every item on a Ray Data actor pool of ``resources.embed.workers`` :class:`TextEncoder` actors.

    Connects to ``resources.ray_address`` (empty = start or join a local Ray) unless Ray is already
    initialised in this process.

    Args:
        cfg: resolved config; reads ``embed`` and ``resources``.
        items: an ``items.parquet`` table.

    Returns:
        (N, D) float32 embeddings, row i = the item with the i-th smallest ``item_id``.
    """
    ensure_ray(cfg)
    res = cfg.resources.embed
    item_ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    texts = item_texts(items, cfg.embed.text)
    if not texts:
        raise ValueError("no items to embed")
    kwargs = encoder_kwargs(cfg.embed)
    # One torch thread pool per actor sized to its CPU share, so N actors don't oversubscribe a node.
    kwargs["num_threads"] = max(1, int(res.cpus_per_worker))
    placement = embed_placement(res.gpus_per_worker, cfg.embed.device)
    kwargs["device"] = placement.pop("device")

    table = pa.table({"item_id": pa.array(item_ids, pa.int64()), "text": pa.array(texts, pa.string())})
    # from_arrow(one table) is one block, and one block feeds one actor: split so every actor gets work.
    n_blocks = max(1, min(-(-len(texts) // cfg.embed.batch_size), 4 * max(1, res.workers)))
    step = -(-len(texts) // n_blocks)
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(texts), step)])
    ds = ds.map_batches(
        TextEncoder,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.embed.batch_size,
        compute=ray.data.ActorPoolStrategy(size=max(1, res.workers)),
        num_cpus=res.cpus_per_worker,
        num_gpus=res.gpus_per_worker,
        batch_format="numpy",
        **placement,  # zero-GPU actors: the node's GPUs hidden (cluster.HIDE_GPUS)
        **DATA_ACTOR_POOL_ARGS,  # see cluster.py: no core_worker ERROR line per pool
    )
    ids_parts, emb_parts = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids_parts.append(np.asarray(batch["item_id"], dtype=np.int64))
        emb_parts.append(np.asarray(batch["embedding"], dtype=np.float32))
    out_ids = np.concatenate(ids_parts)
    emb = np.concatenate(emb_parts)  # (N, D), in completion order
    order = np.argsort(out_ids, kind="stable")
    if not np.array_equal(out_ids[order], np.sort(item_ids)):
        raise RuntimeError("Ray Data embedding lost or duplicated rows")
    return emb[order]
