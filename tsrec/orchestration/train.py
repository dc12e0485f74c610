"""SFT on Ray Train: a ``TorchTrainer`` around ``tsrec.sft.loop.train_sft`` (METHOD.md 1.6, R5), and
:func:`fit_trainer`, the one place that builds a ``TorchTrainer`` (SFT, RL, every Tune trial).

    tsrec sft --config configs/sft_demo.yaml
    ray job submit --working-dir . -- python jobs/sft.py --config configs/industrial_qwen2.5-1.5b.yaml

Workers, CPUs and GPUs per worker come from ``resources.sft``; checkpoints go to ``sft.storage_path``
(a local absolute path or a cloud URI such as ``s3://bucket/runs``; empty = ``<out>/ray``) under the
run name ``<run.name>-sft-<identity>``. ``FailureConfig(max_failures=sft.max_failures)``: a worker that
dies takes the group down, Ray Train restarts it and every worker resumes from the last reported
checkpoint (model, optimizer, scheduler, data position, RNG), so the loss curve continues where it stopped.

The identity (``tsrec.sft.loop.sft_identity``) hashes the resolved ``sft`` config (minus log/save
cadence, storage, fault-tolerance keys and ``max_steps``), ``prompts``, the seed, the worker count and
fingerprints of the inputs. Rerunning the same command with the same identity resumes (Ray 2.60 has no
``resume_from_checkpoint``; STACK.md 3.3); a changed config or input gets another run folder and starts
fresh (the loop also checks the identity stored in each checkpoint). Folders of other identities are
left in place, not deleted: going back to an earlier config resumes (or reuses) that run. ``force=True``
(``tsrec run --force``) deletes this identity's run folder first, so it never resumes.

Outputs in ``--out``: ``model/`` (the best-on-valid Hugging Face folder, else the final one, with the
tokenizer), ``metrics.csv``, ``loss.png``, ``tensorboard/``, ``summary.json``, ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsrec.artifacts import InputError, staging_dir, write_manifest
from tsrec.config import Config, config_from_manifest_dict
from tsrec.orchestration.cluster import ensure_ray, quiet_train_worker, train_logging_config
from tsrec.orchestration.storage import failure_config, filesystem, ray_storage, restart_wait


class RayTrainContext:
    """``RunContext`` inside a ``TorchTrainer`` worker: forwards to ``ray.train``."""

    def __init__(self, artifacts_uri: str, checkpoint=None, storage_endpoint: str = ""):
        import ray.train

        quiet_train_worker()
        tc = ray.train.get_context()
        self.rank, self.world_size = tc.get_world_rank(), tc.get_world_size()
        self.local_rank = tc.get_local_rank()
        import ray.train.torch

        self.device = str(ray.train.torch.get_device())
        self.artifacts_uri = artifacts_uri
        self.storage_endpoint = storage_endpoint
        self._resume, self._cm = None, None
        ckpt = checkpoint if checkpoint is not None else ray.train.get_checkpoint()
        if ckpt is not None:
            # Local storage is used in place; a cloud checkpoint is downloaded to a temporary folder
            # that lives until release_resume() (the loop calls it once loaded) or close().
            self._cm = ckpt.as_directory()
            self._resume = Path(self._cm.__enter__())

    @property
    def resume_dir(self) -> Path | None:
        return self._resume

    def release_resume(self) -> None:
        """Exit ``as_directory()``: deletes a downloaded checkpoint copy (nothing for local storage)."""
        cm, self._cm = self._cm, None
        if cm is not None:
            cm.__exit__(None, None, None)

    close = release_resume

    def report(self, step: int, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report({**clean, "step": step}, checkpoint=ckpt)

    def save_artifact(self, local_dir: Path, name: str) -> None:
        copy_tree(str(local_dir), f"{self.artifacts_uri.rstrip('/')}/{name}", self.storage_endpoint)

    def record_placement(self) -> None:
        """Write where this worker runs (``artifacts/workers/<node>-<pid>.json``): one record per worker and
        attempt, collected into ``summary.json`` so a multi-node run shows which node trained which rank."""
        import json
        import socket
        import time

        import ray

        node = ray.get_runtime_context().get_node_id()
        rec = {"rank": self.rank, "world_size": self.world_size, "node_id": node, "host": socket.gethostname(),
               "pid": os.getpid(), "started_at": time.time()}
        fs, path = _fs(f"{self.artifacts_uri.rstrip('/')}/workers", self.storage_endpoint)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{node}-{os.getpid()}.json") as f:
            f.write(json.dumps(rec).encode())


def run_sft(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
            out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run SFT on Ray Train and collect its outputs in ``out_dir`` (the function ``tsrec sft`` calls).

    Resumes a run with the same identity (see the module doc); ``force`` starts it over instead."""
    # --- 1. validate inputs before starting anything ---
    model_dir, data_dir, sids_dir, out_dir = (Path(p).resolve() for p in (model_dir, data_dir, sids_dir, out_dir))
    semantics_file = check_inputs(
        [(model_dir / "config.json", "model folder (tsrec model init)"),
         (data_dir / "train.parquet", "data folder (tsrec data prepare)"),
         (sids_dir, "SID folder (tsrec sid build)")],
        semantics_file, cfg.sft.use_ts_align,
        "teacher file for TS-Align missing; run `tsrec semantics extract` or set sft.use_ts_align=false")
    from tsrec.train.ranking import check_best_metric

    check_best_metric(cfg.sft)

    # --- 2. trainer ---
    from tsrec.sft.loop import sft_identity

    inputs = {"model": model_dir, "data": data_dir, "sids": sids_dir, "semantics": semantics_file}
    identity = sft_identity(cfg, inputs, cfg.resources.sft.workers)
    run, result = launch(cfg, "sft", sft_worker, identity, inputs, cfg.resources.sft, cfg.sft.storage_path,
                         cfg.sft.max_failures, out_dir, force)

    # --- 3. collect outputs (best model, else final) ---
    with staging_dir(out_dir) as stage:
        chosen = collect_outputs(run.artifacts, run.endpoint, stage)
        workers = sorted((json.loads(p.read_text()) for p in (stage / ".workers").glob("*.json")),
                         key=lambda r: (r["started_at"], r["rank"]))
        shutil.rmtree(stage / ".workers", ignore_errors=True)
        summary = summarize(stage / "metrics.csv")
        summary.update(model=chosen, storage=run.storage, name=run.name, identity=identity, checkpoint=str(result.checkpoint.path) if result.checkpoint else None)
        summary["workers"] = workers  # every worker of every attempt: rank, Ray node id, host, pid
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        write_manifest(stage, "sft", cfg, inputs={"model": model_dir, "data": data_dir, "sids": sids_dir,
                                                  **({"semantics": semantics_file} if semantics_file else {})},
                       outputs=["metrics.csv", "summary.json"], stats=summary, seed=cfg.run.seed)
    return {"out": str(out_dir), **summary}


def check_inputs(required: list[tuple[Path, str]], semantics_file: Path | None, needs_semantics: bool,
                 missing_semantics: str) -> Path | None:
    """InputError for the first missing input (the path and what was expected there), before any worker
    starts; returns the teacher file resolved when the run reads it, else None (not part of its identity)."""
    for path, what in required:
        if not path.exists():
            raise InputError(path, f"missing: expected a {what}")
    if not needs_semantics:
        return None
    if semantics_file is None or not Path(semantics_file).exists():
        raise InputError(semantics_file or "<none>", missing_semantics)
    return Path(semantics_file).resolve()


@dataclass(frozen=True)
class TrainRun:
    """Where a Ray Train run lives: ``<storage>/<name>`` (checkpoints) and its ``artifacts/``."""

    name: str  # <run.name>-<stage>-<identity>
    storage: str  # a local path or an object-store URI
    endpoint: str  # run.storage_endpoint for s3:// URIs

    @property
    def artifacts(self) -> str:
        return artifacts_uri(self.storage, self.name)


def launch(cfg: Config, stage: str, worker, identity: str, inputs: dict[str, Path | None], res, storage_path: str,
           max_failures: int, out_dir: Path, force: bool) -> tuple[TrainRun, Any]:
    """Run a training stage's ``TorchTrainer`` under the run name of its identity (the same identity
    resumes; ``force`` deletes that run first, so it starts over); returns the run and Ray's result."""
    run = TrainRun(f"{cfg.run.name}-{stage}-{identity}", storage_path or str(out_dir / "ray"), cfg.run.storage_endpoint)
    if force:
        delete_tree(run_uri(run.storage, run.name), run.endpoint)  # checkpoints and artifacts: nothing to resume from
    ensure_ray(cfg)
    loop = loop_config(cfg, inputs["model"], inputs["data"], inputs["sids"], inputs["semantics"], run.artifacts, run.endpoint)
    return run, fit_trainer(worker, loop, res, run.name, run.storage, run.endpoint, max_failures,
                            section=f"resources.{stage}")


def run_uri(storage: str, name: str) -> str:
    """The folder (or object-store prefix) of a Ray Train run: its checkpoints and ``artifacts/``."""
    return f"{storage.rstrip('/')}/{name}"


def artifacts_uri(storage: str, name: str) -> str:
    """Where a run's workers put its ``best/``, ``final/``, ``logs/`` and placement records."""
    return f"{run_uri(storage, name)}/artifacts"


def loop_config(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
                artifacts: str, endpoint: str) -> dict[str, Any]:
    """What a training worker receives (``train_loop_config``): the resolved config and its inputs."""
    return {"cfg": cfg.to_dict(), "model": str(model_dir), "data": str(data_dir), "sids": str(sids_dir),
            "semantics": str(semantics_file) if semantics_file else None, "artifacts": artifacts,
            "storage_endpoint": endpoint}


def collect_outputs(artifacts: str, endpoint: str, stage: Path) -> str:
    """A finished run's artifacts into the stage folder: ``model/`` (``best``, else ``final``), the logs'
    files, and the workers' placement records in ``.workers/`` (when any). Returns the model chosen."""
    fetched = stage / ".artifacts"
    copy_tree(artifacts, str(fetched), endpoint)
    chosen = "best" if (fetched / "best" / "config.json").exists() else "final"
    shutil.move(str(fetched / chosen), stage / "model")
    for item in (fetched / "logs").iterdir():
        shutil.move(str(item), stage / item.name)
    if (fetched / "workers").exists():
        shutil.move(str(fetched / "workers"), stage / ".workers")
    shutil.rmtree(fetched)
    return chosen


def fit_trainer(worker, loop_config: dict[str, Any], res, name: str, storage: str, endpoint: str, max_failures: int,
                callbacks: list | None = None, section: str = "resources.sft"):
    """Build and run the ``TorchTrainer`` of a training run (SFT, RL, a Tune trial); returns its result,
    raises its error.

    Workers and placement from ``res`` (``resources.sft`` / ``resources.rl`` / ``tune.resources``),
    checkpoints in ``storage`` under ``name`` (``ray_storage``: a custom S3 endpoint is handed over as a
    filesystem), ``max_failures`` lost worker groups restarted (``failure_config``, ``res.restart_wait_s``),
    two checkpoints kept, Ray Train's INFO lines off the console of a quiet `tsrec run`; ``callbacks`` (a
    Tune trial's report callback) go to the run config; ``section`` names ``res`` in errors.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    worker_resources = {"CPU": res.cpus_per_worker}
    if res.gpus_per_worker > 0:
        worker_resources["GPU"] = res.gpus_per_worker
    trainer = TorchTrainer(
        worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=res.workers, use_gpu=res.gpus_per_worker > 0,
                                     resources_per_worker=worker_resources, placement_strategy=res.placement_strategy),
        # Same name + storage on a rerun (or a restored sweep): Ray Train resumes from the last checkpoint.
        run_config=RunConfig(name=name, **ray_storage(storage, endpoint), callbacks=callbacks,
                             failure_config=failure_config(max_failures, res.restart_wait_s, section),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=train_logging_config()),  # quiet `tsrec run`: WARNING
    )
    with restart_wait(res.restart_wait_s):
        result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise result.error
    return result


def run_in_worker(train_fn, config: dict[str, Any], record_placement: bool = False) -> None:
    """Body of each Ray Train worker: ``train_fn`` (a recipe's ``train_sft`` / ``train_rl``) with a
    Ray-backed context, on the inputs of :func:`loop_config`."""
    cfg = config_from_manifest_dict(config["cfg"])
    ctx = RayTrainContext(config["artifacts"], storage_endpoint=config.get("storage_endpoint", ""))
    if record_placement:
        ctx.record_placement()
    sem = Path(config["semantics"]) if config["semantics"] else None
    try:
        train_fn(cfg, Path(config["model"]), Path(config["data"]), Path(config["sids"]), sem, ctx)
    finally:
        ctx.close()  # a downloaded checkpoint is deleted even when the loop fails before loading it


def sft_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker of an SFT run (``tsrec sft``, a Tune trial): records where it runs, then trains."""
    from tsrec.sft.loop import train_sft

    run_in_worker(train_sft, config, record_placement=True)


def summarize(metrics_csv: Path) -> dict[str, Any]:
    """Steps, first/last/best validation loss and last train loss from ``metrics.csv``."""
    from tsrec.train.metrics import read_metrics_csv

    rows = read_metrics_csv(metrics_csv)
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    return {"steps": int(rows[-1]["step"]) + 1 if rows else 0,
            "final_train_loss": rows[-1].get("train/loss") if rows else None,
            "first_val_loss": evals[0] if evals else None, "final_val_loss": evals[-1] if evals else None,
            "best_val_loss": min(evals) if evals else None}


def copy_tree(src: str, dest: str, endpoint: str = "") -> None:
    """Replace folder ``dest`` by a copy of ``src``; either may be a local path or a cloud URI (pyarrow.fs;
    ``endpoint``: ``run.storage_endpoint`` for s3:// URIs)."""
    import pyarrow.fs as pafs

    src_fs, src_path = _fs(src, endpoint)
    dest_fs, dest_path = _fs(dest, endpoint)
    if dest_fs.get_file_info(dest_path).type != pafs.FileType.NotFound:
        dest_fs.delete_dir(dest_path)
    dest_fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)


def delete_tree(uri: str, endpoint: str = "") -> None:
    """Delete folder ``uri`` (local path or cloud URI) if it exists."""
    import pyarrow.fs as pafs

    fs, path = _fs(uri, endpoint)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def _fs(uri: str, endpoint: str = ""):
    return filesystem(uri, endpoint)
