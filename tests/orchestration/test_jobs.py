"""`ray job submit` against a local head runs a stage and leaves its artifacts."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_ray_job_submit_data_stage(ray_cluster, tmp_path):
    out = tmp_path / "data"
    # The README's command: the shipped runtime env (working_dir ".", its excludes and env_vars), from the repo root.
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "job", "submit",
        "--address", ray_cluster["dashboard_url"],
        "--runtime-env", "cluster/runtime_env.yaml",
        "--entrypoint-num-cpus", "0",
        "--",
        "python", "jobs/data.py", "--source", "synthetic", "--out", str(out), "data.synthetic.n_items=60",
        "data.synthetic.n_users=80",
    ]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for _ in range(12):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
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
    # The job ran with cluster/runtime_env.yaml's env_vars (so that file is the one this test covers).
    from ray.job_submission import JobSubmissionClient

    job_id = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
    job_env = JobSubmissionClient(ray_cluster["dashboard_url"]).get_job_info(job_id).runtime_env
    shipped = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert job_env["env_vars"] == shipped["env_vars"] and job_env["excludes"] == shipped["excludes"]


# jobs/<stage>.py as `ray job submit` starts them: cwd = the uploaded working dir, RAY_ADDRESS = the
# cluster. Running them as plain subprocesses against the session's head keeps the upload out of it.
def _run_job(ray_cluster, script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.ray
def test_sid_job_builds_unique_sids_on_ray(ray_cluster, tmp_path):
    from tsrec.config import load_config
    from tsrec.data.prepare import prepare_data
    from tsrec.data.schema import read_items

    data, out = tmp_path / "data", tmp_path / "sids"
    prepare_data(load_config(None, ["data.synthetic.n_items=40", "data.synthetic.n_users=30",
                                    "data.synthetic.n_categories=4"]), data)  # fmt: skip
    _run_job(ray_cluster, "sid.py", "--data", str(data), "--out", str(out), "sid.codebook_size=4",
             "sid.min_points_per_code=1", "sid.collision=extra_level", "embed.max_length=32", "embed.batch_size=16")
    items = read_items(data).column("item_id").to_pylist()
    index = json.loads((out / "index.json").read_text())
    assert sorted(map(int, index)) == sorted(items)
    assert len({tuple(t) for t in index.values()}) == len(items)  # unique after collision handling
    for tokens in index.values():  # 3 levels of 4 codes + the <d_r> collision token (extra_level)
        assert [t[:3] for t in tokens] == ["<a_", "<b_", "<c_", "<d_"] and all(int(t[3:-1]) < 4 for t in tokens[:3])
    assert json.loads((out / "manifest.json").read_text())["stage"] == "sid"
    assert (out / "sids.parquet").exists() and (out / "stats.json").exists()
    # The embeddings ran on the cluster: the job's driver owned Ray Data map workers (--ray is on).
    from ray.util.state import list_actors, list_jobs

    api = ray_cluster["dashboard_url"]
    drivers = [j for j in list_jobs(address=api, detail=True) if str(out) in (j.entrypoint or "")]
    assert len(drivers) == 1, "jobs/sid.py never connected to the cluster"
    actors = list_actors(address=api, filters=[("job_id", "=", drivers[0].job_id)], limit=1000, detail=True)
    assert any("MapWorker" in a.class_name for a in actors), [a.class_name for a in actors]


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """13 items with 3-token SIDs, 6 test rows and a tiny Qwen2 that knows every SID token."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tsrec.artifacts import atomic_write_json
    from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA
    from tsrec.sid.index import SidIndex
    from tsrec.tiny import save_tiny_sid_model

    root = tmp_path_factory.mktemp("eval_job")
    index = SidIndex.from_codes(range(13), [(i % 3, (i * 5) % 4, (i * 7) % 5) for i in range(13)])
    atomic_write_json(root / "sids" / "index.json", index.to_json_obj())
    (root / "data").mkdir()
    pq.write_table(pa.table({"item_id": list(range(13)), "title": [f"item {i}" for i in range(13)],
                             "description": [""] * 13}, schema=ITEMS_SCHEMA), root / "data" / "items.parquet")
    hist, target = [[0], [1, 2], [3, 4, 5], [6], [7, 8], [9, 10, 11, 12]], [1, 3, 4, 7, 9, 0]
    pq.write_table(pa.table({"user_id": [f"A{i}" for i in range(6)], "history_item_ids": hist, "item_id": target,
                             "timestamp": list(range(6))}, schema=SAMPLES_SCHEMA), root / "data" / "test.parquet")
    model = save_tiny_sid_model(root / "model", index.all_tokens(), texts=["item"], seed=5)
    return model, root / "data", root / "sids"


@pytest.mark.ray
def test_evaluate_job_matches_the_cli(ray_cluster, eval_inputs, tmp_path):
    import pyarrow.parquet as pq

    from tsrec.cli import main

    model, data, sids = eval_inputs
    args = ["--model", str(model), "--data", str(data), "--sids", str(sids), "--split", "test", "--beams", "4"]
    # The job shards rows over 2 Ray actors; the CLI decodes in this process (1 worker).
    _run_job(ray_cluster, "evaluate.py", *args, "--out", str(tmp_path / "job"), "eval.batch_size=2",
             "resources.eval.workers=2")
    assert main(["eval", *args, "--out", str(tmp_path / "cli"), "eval.batch_size=2"]) == 0
    metrics = json.loads((tmp_path / "job" / "metrics.json").read_text())
    assert (metrics["rows"], metrics["beams"], metrics["invalid_sids"]) == (6, 4, 0)
    assert metrics == json.loads((tmp_path / "cli" / "metrics.json").read_text())
    job, cli = (pq.read_table(tmp_path / d / "rankings.parquet").to_pylist() for d in ("job", "cli"))
    assert [r["ranked_sids"] for r in job] == [r["ranked_sids"] for r in cli]
    assert [r["row"] for r in job] == list(range(6))


def test_evaluate_job_exits_nonzero_on_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/evaluate.py", "--model", str(tmp_path / "missing"), "--data",
                           str(tmp_path), "--sids", str(tmp_path), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "tsrec: error" in proc.stderr and str(tmp_path) in proc.stderr
