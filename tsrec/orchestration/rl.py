"""RL (GRPO) on Ray Train: a ``TorchTrainer`` around ``tsrec.rl.loop.train_rl`` (METHOD.md 1.7, R7).

    tsrec rl --config configs/demo.yaml
    ray job submit --working-dir . -- python jobs/rl.py --config configs/industrial_qwen2.5-1.5b-rl.yaml

Built like ``tsrec.orchestration.train.run_sft`` (its context and storage helpers are reused): workers
from ``resources.rl``; checkpoints under ``rl.storage_path`` (empty = ``<out>/ray``) in the run folder
``<run.name>-rl-<identity>``; ``FailureConfig(max_failures=rl.max_failures)``: a dead worker takes the
group down and every worker resumes from the last reported checkpoint (model, optimizer, scheduler,
data position, RNG, guard state, reference weights). Rerunning with the same identity resumes; ``force``
deletes this identity's run folder first.

Outputs in ``--out``: ``model/`` (the best-on-valid Hugging Face folder: the SFT start itself when RL
never beat it on valid NDCG@10), ``metrics.csv``, ``rl.png``, ``tensorboard/``, ``summary.json``,
``manifest.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tsrec.artifacts import InputError, staging_dir, write_manifest
from tsrec.config import Config, config_from_manifest_dict
from tsrec.orchestration.cluster import ensure_ray
from tsrec.orchestration.train import RayTrainContext, copy_tree, delete_tree, fit_trainer


def run_rl(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
           out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run RL on Ray Train and collect its outputs in ``out_dir`` (what ``tsrec rl`` calls)."""
    from tsrec.rl.loop import rl_identity

    model_dir, data_dir, sids_dir, out_dir = (Path(p).resolve() for p in (model_dir, data_dir, sids_dir, out_dir))
    for path, what in ((model_dir / "config.json", "model folder (the SFT model/)"),
                       (data_dir / "train.parquet", "data folder (tsrec data prepare)"),
                       (sids_dir / "index.json", "SID folder (tsrec sid build)")):
        if not path.exists():
            raise InputError(path, f"missing: expected a {what}")
    if "semantic" in cfg.rl.reward:
        if semantics_file is None or not Path(semantics_file).exists():
            raise InputError(semantics_file or "<none>", f"teacher file needed by rl.reward={cfg.rl.reward}; run "
                             "`tsrec semantics extract` or set rl.reward=ranking")
        semantics_file = Path(semantics_file).resolve()
    else:
        semantics_file = None

    res = cfg.resources.rl
    identity = rl_identity(cfg, {"model": model_dir, "data": data_dir, "sids": sids_dir, "semantics": semantics_file},
                           res.workers)
    name = f"{cfg.run.name}-rl-{identity}"
    storage = cfg.rl.storage_path or str(out_dir / "ray")
    endpoint = cfg.run.storage_endpoint
    run_uri = f"{storage.rstrip('/')}/{name}"
    artifacts = f"{run_uri}/artifacts"
    if force:
        delete_tree(run_uri, endpoint)
    ensure_ray(cfg)
    result = fit_trainer(
        _rl_worker,
        {"cfg": cfg.to_dict(), "model": str(model_dir), "data": str(data_dir), "sids": str(sids_dir),
         "semantics": str(semantics_file) if semantics_file else None, "artifacts": artifacts,
         "storage_endpoint": endpoint},
        res, name, storage, endpoint, cfg.rl.max_failures)

    with staging_dir(out_dir) as stage:
        fetched = stage / ".artifacts"
        copy_tree(artifacts, str(fetched), endpoint)
        chosen = "best" if (fetched / "best" / "config.json").exists() else "final"
        shutil.move(str(fetched / chosen), stage / "model")
        for item in (fetched / "logs").iterdir():
            shutil.move(str(item), stage / item.name)
        shutil.rmtree(fetched)
        summary = summarize_rl(stage / "metrics.csv")
        summary.update(model=chosen, storage=storage, name=name, identity=identity,
                       checkpoint=str(result.checkpoint.path) if result.checkpoint else None)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        from tsrec.rl.loop import progress_line

        print(f"[tsrec rl] {cfg.rl.reward}: {progress_line(summary)}", flush=True)
        write_manifest(stage, "rl", cfg, inputs={"model": model_dir, "data": data_dir, "sids": sids_dir,
                                                 **({"semantics": semantics_file} if semantics_file else {})},
                       outputs=["metrics.csv", "summary.json"], stats=summary, seed=cfg.run.seed)
    return {"out": str(out_dir), **summary}


def _rl_worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the RL loop with a Ray-backed context."""
    from tsrec.rl.loop import train_rl

    cfg = config_from_manifest_dict(config["cfg"])
    ctx = RayTrainContext(config["artifacts"], storage_endpoint=config.get("storage_endpoint", ""))
    sem = Path(config["semantics"]) if config["semantics"] else None
    try:
        train_rl(cfg, Path(config["model"]), Path(config["data"]), Path(config["sids"]), sem, ctx)
    finally:
        ctx.close()


def summarize_rl(metrics_csv: Path) -> dict[str, Any]:
    """Steps, the SFT start vs the best valid NDCG@10 (``tsrec.rl.loop.valid_progress``), the last valid
    metrics, last reward and KL from ``metrics.csv``."""
    from tsrec.rl.loop import valid_progress
    from tsrec.sft.checkpoint import read_metrics_csv

    rows = read_metrics_csv(metrics_csv)
    steps = [r for r in rows if r["step"] >= 0]  # row -1 is the SFT start (valid metrics only)
    evals = [r for r in steps if "eval/ndcg@10" in r]
    last = steps[-1] if steps else {}
    return {"steps": int(last["step"]) + 1 if steps else 0,
            "final_reward_mean": last.get("rollout/reward_mean"), "final_kl": last.get("train/kl"),
            **valid_progress(rows),
            "final_valid": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None}
