"""RL (GRPO) on Ray Train: a ``TorchTrainer`` around ``tsrec.rl.loop.train_rl`` (METHOD.md 1.7, R7).

    tsrec rl --config configs/demo.yaml
    ray job submit --working-dir . -- python jobs/rl.py --config configs/industrial_qwen2.5-1.5b-rl.yaml

Built like ``tsrec.orchestration.train.run_sft`` (the same ``fit_trainer``, input checks and output
collection): workers from ``resources.rl``; checkpoints under ``rl.storage_path`` (empty = ``<out>/ray``) in the run folder
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
from pathlib import Path
from typing import Any

from tsrec.artifacts import staging_dir, write_manifest
from tsrec.config import Config
from tsrec.orchestration.train import check_inputs, collect_outputs, launch, run_in_worker


def run_rl(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
           out_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run RL on Ray Train and collect its outputs in ``out_dir`` (what ``tsrec rl`` calls)."""
    from tsrec.rl.logs import progress_line
    from tsrec.rl.loop import check_rl_config, rl_identity

    # --- 1. validate inputs before starting anything ---
    model_dir, data_dir, sids_dir, out_dir = (Path(p).resolve() for p in (model_dir, data_dir, sids_dir, out_dir))
    semantics_file = check_inputs(
        [(model_dir / "config.json", "model folder (the SFT model/)"),
         (data_dir / "train.parquet", "data folder (tsrec data prepare)"),
         (sids_dir / "index.json", "SID folder (tsrec sid build)")],
        semantics_file, "semantic" in cfg.rl.reward,
        f"teacher file needed by rl.reward={cfg.rl.reward}; run `tsrec semantics extract` or set rl.reward=ranking")
    # Every config the workers would refuse (sampling temperature, PPO clip, batch sizes over the workers, an
    # encoder for rl.semantic_similarity=embedding, ...) is refused here, before Ray Train starts.
    check_rl_config(cfg, semantics_file, cfg.resources.rl.workers)

    # --- 2. trainer ---
    inputs = {"model": model_dir, "data": data_dir, "sids": sids_dir, "semantics": semantics_file}
    identity = rl_identity(cfg, inputs, cfg.resources.rl.workers)
    run, result = launch(cfg, "rl", rl_worker, identity, inputs, cfg.resources.rl, cfg.rl.storage_path,
                         cfg.rl.max_failures, out_dir, force)

    # --- 3. collect outputs (best on valid, else final) ---
    with staging_dir(out_dir) as stage:
        chosen = collect_outputs(run.artifacts, run.endpoint, stage)
        summary = summarize_rl(stage / "metrics.csv")
        summary.update(model=chosen, storage=run.storage, name=run.name, identity=identity,
                       checkpoint=str(result.checkpoint.path) if result.checkpoint else None)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"[tsrec rl] {cfg.rl.reward}: {progress_line(summary)}", flush=True)
        write_manifest(stage, "rl", cfg, inputs={"model": model_dir, "data": data_dir, "sids": sids_dir,
                                                 **({"semantics": semantics_file} if semantics_file else {})},
                       outputs=["metrics.csv", "summary.json"], stats=summary, seed=cfg.run.seed)
    return {"out": str(out_dir), **summary}


def rl_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker of an RL run: the RL recipe with a Ray-backed context."""
    from tsrec.rl.loop import train_rl

    run_in_worker(train_rl, config)


def summarize_rl(metrics_csv: Path) -> dict[str, Any]:
    """Steps, the SFT start vs the best valid NDCG@10 (``tsrec.rl.logs.valid_progress``), the last valid
    metrics, last reward and KL from ``metrics.csv``."""
    from tsrec.rl.logs import valid_progress
    from tsrec.train.metrics import read_metrics_csv

    rows = read_metrics_csv(metrics_csv)
    steps = [r for r in rows if r["step"] >= 0]  # row -1 is the SFT start (valid metrics only)
    evals = [r for r in steps if "eval/ndcg@10" in r]
    last = steps[-1] if steps else {}
    return {"steps": int(last["step"]) + 1 if steps else 0,
            "final_reward_mean": last.get("rollout/reward_mean"), "final_kl": last.get("train/kl"),
            **valid_progress(rows),
            "final_valid": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None}
