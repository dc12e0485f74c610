"""Slower SFT entry points and DeepSpeed options users hit (opt-in: ``pytest -m slow``).

- optimizer offload (DeepSpeedCPUAdam, a ~45 s JIT build) and ZeRO-3 parameter offload;
- the torchrun entry ``python -m torch.distributed.run --nproc_per_node 2 -m tsrec.sft.loop --config F``;
- LoRA under Ray Train (2 workers);
- ``jobs/sft.py`` and ``jobs/pipeline.py`` submitted with ``ray job submit``.

Each uses the tiny synthetic run (``sft_synth``) and 2 optimiser steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_synth import make_tiny_run
from tsrec.config import load_config, save_config
from tsrec.train.metrics import read_metrics_csv

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BASE = ["sft.global_batch_size=8", "sft.micro_batch_size=2", "sft.lr=3e-3", "sft.warmup_steps=1", "sft.max_steps=2",
        "sft.eval_every_steps=2", "sft.save_every_steps=2", "sft.precision=fp32", "run.name=t"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("sft_paths_tiny"))


def _check(out: Path, rows_dir: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = read_metrics_csv(rows_dir / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["train/loss"]) for r in rows) and math.isfinite(rows[-1]["eval/loss"])
    AutoModelForCausalLM.from_pretrained(out)
    return rows


@pytest.mark.parametrize("overrides", [["sft.zero_stage=2", "sft.offload_optimizer=true"],
                                       ["sft.zero_stage=3", "sft.offload_optimizer=true", "sft.offload_params=true"]],
                         ids=["offload_optimizer", "offload_params"])
def test_offload(tiny, tmp_path, overrides):
    from tsrec.runtime import LocalContext
    from tsrec.sft.loop import train_sft

    cfg = load_config(None, [*BASE, *overrides])
    train_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(tmp_path))
    _check(tmp_path / "final", tmp_path / "logs")


def test_torchrun_entry_two_ranks(tiny, tmp_path):
    cfg = load_config(None, [*BASE, "sft.zero_stage=2"])
    save_config(cfg, tmp_path / "sft.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tsrec.sft.loop", "--config", str(tmp_path / "sft.yaml"), "--model", str(tiny["model"]),
           "--data", str(tiny["data"]), "--sids", str(tiny["sids"]), "--semantics", str(tiny["semantics"]),
           "--out", str(tmp_path / "out")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world=2" in proc.stdout
    _check(tmp_path / "out" / "final", tmp_path / "out" / "logs")
    assert (tmp_path / "out" / "checkpoints" / "step_1" / "meta.json").exists()


@pytest.mark.ray
def test_lora_under_ray(ray_cluster, tiny, tmp_path):
    from tsrec.orchestration.train import run_sft

    cfg = load_config(None, [*BASE, "sft.lora.enabled=true", "sft.lora.r=4", "resources.sft.workers=2",
                             "resources.sft.cpus_per_worker=1"])
    result = run_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], tmp_path)
    assert result["steps"] == 2
    _check(tmp_path / "model", tmp_path)


def _submit(ray_cluster, entry: list[str]) -> str:
    runtime_env = {"excludes": [".venv", ".git", "runs", "benchmarks", "*.parquet", "*.safetensors"]}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray_cluster["dashboard_url"],
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--entrypoint-num-cpus", "0",
           "--", "python", *entry]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for _ in range(12):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if "No available agent" not in proc.stderr + proc.stdout:  # the job agent starts a bit after the head
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.ray
def test_jobs_sft_and_pipeline(ray_cluster, tmp_path):
    root = tmp_path / "run"
    make_tiny_run(root)
    common = [*BASE, "resources.sft.workers=1", "resources.sft.cpus_per_worker=1", f"run.out_dir={root}"]
    _submit(ray_cluster, ["jobs/sft.py", *common])
    first = read_metrics_csv(root / "sft" / "metrics.csv")
    assert json.loads((root / "sft" / "manifest.json").read_text())["stage"] == "sft"
    # The pipeline job with --force (stages: sft only) trains again instead of resuming that run.
    _submit(ray_cluster, ["jobs/pipeline.py", "--force", *common, "pipeline.stages=[sft]"])
    again = read_metrics_csv(root / "sft" / "metrics.csv")
    assert json.loads((root / "pipeline.json").read_text())["stages"]["sft"]["steps"] == 2
    assert min(r["attempt/started_at"] for r in again) > max(r["attempt/started_at"] for r in first)
