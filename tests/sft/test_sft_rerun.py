"""Run identity on Ray Train: a rerun with a changed config trains again, `tsrec run --force` never
resumes, the same config resumes its own run; a downloaded (cloud) checkpoint copy is deleted.

One tiny run folder (``sft_synth``), 1 worker, 2 optimiser steps per run, driven through the CLI the
way a user types it (``tsrec run`` with ``pipeline.stages=[sft]``, ``tsrec sft``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_synth import make_tiny_run
from tsrec.cli import main
from tsrec.train.metrics import read_metrics_csv

pytestmark = pytest.mark.ray

COMMON = ["sft.global_batch_size=8", "sft.micro_batch_size=4", "sft.lr=3e-3", "sft.warmup_steps=0", "sft.max_steps=2",
          "sft.eval_every_steps=2", "sft.save_every_steps=2", "sft.precision=fp32", "resources.sft.workers=1",
          "resources.sft.cpus_per_worker=1", "run.name=t", "pipeline.stages=[sft]"]


def _rows(root: Path) -> list[dict]:
    rows = read_metrics_csv(root / "sft" / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 1]
    return rows


def _fresh_after(rows: list[dict], earlier: list[dict]) -> None:
    """Every step of ``rows`` was computed by one new attempt that started at step 0."""
    assert {r["attempt/start_step"] for r in rows} == {0}
    assert min(r["attempt/started_at"] for r in rows) > max(r["attempt/started_at"] for r in earlier)


def test_changed_config_retrains_and_force_never_resumes(ray_cluster, tmp_path):
    make_tiny_run(tmp_path)
    common = [*COMMON, f"run.out_dir={tmp_path}"]

    assert main(["run", *common]) == 0
    first = _rows(tmp_path)
    assert {r["attempt/start_step"] for r in first} == {0}

    # `tsrec sft` with another lr: a new identity, so it trains from step 0 with the new schedule.
    assert main(["sft", *common, "sft.lr=3e-2"]) == 0
    changed = _rows(tmp_path)
    _fresh_after(changed, first)
    for a, b in zip(first, changed):
        assert b["train/lr"] == pytest.approx(10 * a["train/lr"], rel=1e-6)
    assert json.loads((tmp_path / "sft" / "manifest.json").read_text())["config"]["sft"]["lr"] == 3e-2
    assert abs(changed[-1]["train/loss"] - first[-1]["train/loss"]) > 1e-6  # really another model

    # `tsrec run` with the first config: sft/ now holds the other run's outputs, so it is not skipped;
    # the same identity resumes its finished run (nothing trained, the first run's rows come back).
    assert main(["run", *common]) == 0
    same = _rows(tmp_path)
    assert [r["attempt/started_at"] for r in same] == [r["attempt/started_at"] for r in first]

    # `--force` starts the run over: a new attempt from step 0, the same losses (deterministic).
    assert main(["run", "--force", *common]) == 0
    forced = _rows(tmp_path)
    _fresh_after(forced, same)
    for a, b in zip(first, forced):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-4
    runs = sorted(p.name for p in (tmp_path / "sft" / "ray").iterdir() if p.name.startswith("t-sft-"))
    assert len(runs) == 2  # one Ray run folder per identity


def test_downloaded_checkpoint_is_deleted(ray_cluster, tmp_path):
    """A checkpoint on a non-local filesystem (as s3://) is downloaded by ``as_directory``; the context
    deletes the copy once the loop has loaded it (``release_resume``)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "x.txt").write_text("state")

    def worker(config):  # nested: pickled by value for the worker
        import json as _json
        from pathlib import Path as _Path

        import pyarrow.fs as pafs
        import ray.train

        from tsrec.orchestration.train import RayTrainContext

        fs = pafs.SubTreeFileSystem(config["root"], pafs.LocalFileSystem())  # not local to Ray: downloaded
        ctx = RayTrainContext(config["root"] + "/artifacts", checkpoint=ray.train.Checkpoint("ckpt", filesystem=fs))
        d = ctx.resume_dir
        during = (d / "x.txt").read_text() == "state" and d != _Path(config["root"]) / "ckpt"
        ctx.release_resume()
        _Path(config["root"], "seen.json").write_text(_json.dumps({"during": during, "after": d.exists()}))

    TorchTrainer(worker, train_loop_config={"root": str(tmp_path)}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(name="ckpt", storage_path=str(tmp_path / "ray"))).fit()
    assert json.loads((tmp_path / "seen.json").read_text()) == {"during": True, "after": False}
