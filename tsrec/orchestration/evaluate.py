"""``tsrec eval``: constrained beam-search evaluation, sharded over Ray actors (METHOD.md 1.8, R10).

    tsrec eval --model DIR --data DIR --sids DIR --split test --beams 20 --out DIR

Rows of the split are cut into contiguous shards **on batch boundaries** (``cfg.eval.batch_size``),
one per ``EvalActor`` (``cfg.resources.eval.workers`` actors, each with
``cfg.resources.eval.gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs; see :func:`resolve_eval_placement`
for the defaults). Every actor loads the model
once, decodes its shard with :func:`tsrec.decode.evaluate.evaluate_shard` and returns per-row
results; the driver merges them in row order and writes ``rankings.parquet``, ``metrics.json`` and
``manifest.json``. Because every prompt lands in the same batch whatever the number of workers,
results do not depend on sharding. With one worker and no cluster to join (no ``resources.ray_address``, no
``RAY_ADDRESS``) everything runs in-process; on a cluster (a RayJob's driver runs on the
head pod, which has no GPU) even one worker is an actor, on a GPU whenever the cluster has or can scale up
GPUs (:func:`eval_in_driver`, :func:`tsrec.orchestration.cluster.cluster_gpus`). The manifest's
``placement`` stat and one console line say where the decoding ran and on which device.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from tsrec.config import Config
from tsrec.decode.evaluate import evaluate_local, evaluate_shard, load_rows, write_results


def shard_rows(rows: list[Any], workers: int, batch_size: int) -> list[list[Any]]:
    """Contiguous shards whose boundaries fall on multiples of ``batch_size`` (empty shards dropped)."""
    n_batches = -(-len(rows) // batch_size)
    per, extra = divmod(n_batches, max(1, workers))
    shards, start = [], 0
    for w in range(max(1, workers)):
        count = (per + (1 if w < extra else 0)) * batch_size
        if rows[start : start + count]:
            shards.append(rows[start : start + count])
        start += count
    return shards


class EvalPlacementError(ValueError):
    """The eval resources ask for a device the actors would not own (e.g. CUDA on a zero-GPU actor)."""


def resolve_eval_placement(gpus_per_worker: float | None, device: str, cluster_gpus: float) -> tuple[float, str]:
    """``(num_gpus per actor, eval device for the actor)`` from the config and the cluster's GPU count.

    Ray 2.60 no longer sets ``CUDA_VISIBLE_DEVICES=""`` for actors with ``num_gpus=0``: every such
    actor sees all GPUs and ``device=auto`` would put all of them on ``cuda:0``. So:

    - ``gpus_per_worker=None`` (default): 1 GPU per actor when the cluster has GPUs, else 0;
    - an actor with 0 GPUs decodes on CPU explicitly (``device=auto`` -> ``cpu``);
    - 0 GPUs with an explicit CUDA device is an :class:`EvalPlacementError` (actors would share GPUs
      Ray does not know they use);
    - a fractional GPU is allowed when asked for explicitly (several actors per GPU, by choice).
    """
    gpus = (1.0 if cluster_gpus >= 1 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if gpus < 0:
        raise EvalPlacementError(f"resources.eval.gpus_per_worker must be >= 0, got {gpus_per_worker}")
    if gpus == 0:
        if device.startswith("cuda"):
            raise EvalPlacementError(
                f"eval.device={device} with resources.eval.gpus_per_worker=0: zero-GPU Ray actors all see every "
                "GPU and would share it; set resources.eval.gpus_per_worker (or leave it unset) or eval.device=cpu"
            )
        return 0.0, "cpu" if device == "auto" else device
    return gpus, device


def eval_in_driver(workers: int, on_cluster: bool, gpus_per_worker: float | None) -> bool:
    """Whether the evaluation decodes in this process instead of Ray actors.

    Only one worker on a driver that runs its own Ray, if any (a laptop or CI box: ``resources.ray_address``
    empty and ``RAY_ADDRESS`` unset), and no GPU asked for explicitly. Under `ray job submit` and on
    KubeRay the driver runs on the head pod, which has no GPU (and ``num-cpus: 0``): there even one worker
    is a Ray actor, placed on a GPU worker whenever the cluster has or can scale up GPUs.
    """
    if workers > 1 or on_cluster:
        return False
    return not (gpus_per_worker or 0) > 0


def _on_cluster(cfg: Config) -> bool:
    """Whether this driver joins a Ray cluster (``resources.ray_address``, or ``RAY_ADDRESS``, which `ray job
    submit` sets for every job driver) rather than running one of its own on this machine."""
    from tsrec.orchestration.cluster import ray_address

    return ray_address(cfg) != "local"


def _say(placement: dict[str, Any]) -> None:
    import sys

    where = "this process (no cluster joined)" if placement["where"] == "driver" else \
        f"{placement['actors']} Ray actor(s) with {placement['gpus_per_actor']:g} GPU(s) each"
    print(f"eval: decoding in {where} on {placement['device']}", file=sys.stderr, flush=True)


def _actor_class():
    import ray

    @ray.remote
    class EvalActor:
        """One model replica (one GPU, or CPU threads) decoding one shard."""

        def run(self, cfg: Config, model_dir: str, sids_dir: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            import torch

            if cfg.eval.device == "cpu" or not torch.cuda.is_available():
                torch.set_num_threads(max(1, int(cfg.resources.eval.cpus_per_worker)))
            return evaluate_shard(cfg, model_dir, sids_dir, rows)

        def device(self, device: str) -> str:
            """The torch device this actor decodes on (``eval.device`` resolved here, where it matters)."""
            from tsrec.embed import resolve_device

            return resolve_device(device)

    return EvalActor


def run_eval(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``cfg.eval.split`` of ``data_dir``; returns the metrics (+ workers, seconds,
    ``placement``: where it decoded, on which device).

    Raises:
        InputError: missing/malformed inputs (split, index, SID tokens not in the tokenizer).
        RuntimeError: a returned SID is not a catalogue SID (the outputs are still written).
        EvalPlacementError: a CUDA device asked for on zero-GPU actors.
    """
    workers = cfg.resources.eval.workers
    res = cfg.resources.eval
    if eval_in_driver(workers, _on_cluster(cfg), res.gpus_per_worker):
        from tsrec.embed import resolve_device

        placement = {"where": "driver", "actors": 0, "gpus_per_actor": 0.0, "device": resolve_device(cfg.eval.device)}
        _say(placement)
        return evaluate_local(cfg, Path(model_dir), Path(data_dir), Path(sids_dir), Path(out_dir),
                              extra={"placement": placement})

    import ray

    from tsrec.orchestration.cluster import cluster_gpus, cpu_only_runtime_env, ensure_ray

    t0 = time.perf_counter()
    ensure_ray(cfg)
    rows = load_rows(cfg, data_dir, sids_dir)
    shards = shard_rows(rows, workers, cfg.eval.batch_size)
    # cluster_gpus: GPUs now or once the autoscaler scales a GPU group up from zero, so "auto" never
    # silently means CPU actors on a GPU cluster whose workers are not up yet.
    gpus, device = resolve_eval_placement(res.gpus_per_worker, cfg.eval.device, cluster_gpus())
    actor_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, device=device))
    options: dict[str, Any] = {"num_cpus": res.cpus_per_worker, "num_gpus": gpus}
    if gpus == 0:
        options["runtime_env"] = cpu_only_runtime_env()  # a zero-GPU actor must not see (and use) the node's GPUs
    actor_cls = _actor_class().options(**options)
    actors = [actor_cls.remote() for _ in shards]
    try:
        devices = ray.get([a.device.remote(device) for a in actors])
        placement = {"where": "actors", "actors": len(actors), "gpus_per_actor": gpus,
                     "device": ",".join(sorted(set(devices)))}
        _say(placement)
        parts = ray.get([a.run.remote(actor_cfg, str(model_dir), str(sids_dir), s) for a, s in zip(actors, shards)])
    finally:
        for a in actors:
            ray.kill(a)
    results = [r for part in parts for r in part]
    assert [r["row"] for r in results] == [r["row"] for r in rows], "shards merged out of row order"
    inputs = {"model": Path(model_dir), "data": Path(data_dir), "sids": Path(sids_dir)}
    return write_results(cfg, results, out_dir, inputs,
                         {"workers": len(shards), "seconds": round(time.perf_counter() - t0, 2), "placement": placement})
