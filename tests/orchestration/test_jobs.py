"""`ray job submit` against a local head runs a stage and leaves its artifacts."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_ray_job_submit_data_stage(ray_cluster, tmp_path):
    out = tmp_path / "data"
    runtime_env = {"excludes": [".venv", ".git", "runs", "benchmarks", "*.parquet", "*.safetensors"]}
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
        "--address", ray_cluster["dashboard_url"],
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env),
        "--entrypoint-num-cpus", "0",
        "--",
        "python", "jobs/data.py", "--source", "synthetic", "--out", str(out), "data.synthetic.n_items=60",
        "data.synthetic.n_users=80",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for _ in range(12):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        # The head's job agent starts a few seconds after ray.init returns; the server says so.
        if "No available agent" not in proc.stderr + proc.stdout:
            break
        time.sleep(5)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout + proc.stderr
    for name in ("items.parquet", "train.parquet", "valid.parquet", "test.parquet", "manifest.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "data"
