"""``tsrec eval``: constrained beam-search evaluation, sharded over Ray actors (METHOD.md 1.8, R10).

    tsrec eval --model DIR --data DIR --sids DIR --split test --beams 20 --out DIR

Rows of the split are cut into contiguous shards **on batch boundaries** (``cfg.eval.batch_size``),
one per ``EvalActor`` (``cfg.resources.eval.workers`` actors, each with
``cfg.resources.eval.gpus_per_worker`` GPUs and ``cpus_per_worker`` CPUs). Every actor loads the model
once, decodes its shard with :func:`tsrec.decode.evaluate.evaluate_shard` and returns per-row
results; the driver merges them in row order and writes ``rankings.parquet``, ``metrics.json`` and
``manifest.json``. Because every prompt lands in the same batch whatever the number of workers,
results do not depend on sharding. With one worker everything runs in-process, without Ray.
"""

from __future__ import annotations

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


def _actor_class():
    import ray

    @ray.remote
    class EvalActor:
        """One model replica (one GPU, or CPU threads) decoding one shard."""

        def run(self, cfg: Config, model_dir: str, sids_dir: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            import torch

            if not torch.cuda.is_available():
                torch.set_num_threads(max(1, int(cfg.resources.eval.cpus_per_worker)))
            return evaluate_shard(cfg, model_dir, sids_dir, rows)

    return EvalActor


def run_eval(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Evaluate ``model_dir`` on ``cfg.eval.split`` of ``data_dir``; returns the metrics (+ workers, seconds).

    Raises:
        InputError: missing/malformed inputs (split, index, SID tokens not in the tokenizer).
        RuntimeError: a returned SID is not a catalogue SID (the outputs are still written).
    """
    workers = cfg.resources.eval.workers
    if workers <= 1:
        return evaluate_local(cfg, Path(model_dir), Path(data_dir), Path(sids_dir), Path(out_dir))

    import ray

    from tsrec.orchestration.cluster import ensure_ray

    t0 = time.perf_counter()
    ensure_ray(cfg)
    rows = load_rows(cfg, data_dir, sids_dir)
    shards = shard_rows(rows, workers, cfg.eval.batch_size)
    res = cfg.resources.eval
    actor_cls = _actor_class().options(num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker)
    actors = [actor_cls.remote() for _ in shards]
    try:
        parts = ray.get([a.run.remote(cfg, str(model_dir), str(sids_dir), s) for a, s in zip(actors, shards)])
    finally:
        for a in actors:
            ray.kill(a)
    results = [r for part in parts for r in part]
    assert [r["row"] for r in results] == [r["row"] for r in rows], "shards merged out of row order"
    inputs = {"model": Path(model_dir), "data": Path(data_dir), "sids": Path(sids_dir)}
    return write_results(cfg, results, out_dir, inputs,
                         {"workers": len(shards), "seconds": round(time.perf_counter() - t0, 2)})
