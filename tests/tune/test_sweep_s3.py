"""Sweep storage on an object store (issue 20, item 6): ``tune.storage_path=s3://...`` on a local S3 server (moto,
``tests/s3_server.py``, as the SFT and RL S3 tests). The Tune experiment and every trial's Ray Train run live in the
bucket only; a driver SIGKILLed mid-sweep is resumed from the bucket (the finished trial is not started again, the
interrupted one's ``TorchTrainer`` resumes from its checkpoint in the bucket); the finished sweep run again restores
without starting a trial; ``best_model/`` is fetched into the local ``<out>/<tune.dir>/``. The storage is checked
before anything starts (``ConfigError`` naming ``tune.storage_path``).

The sweep test is ``ray`` and ``slow`` (2.5-4 min on 2 shared cores: data, SIDs, one init, 2 x 6-step trials, a
restore, a rerun).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from s3_server import S3_TEST_ENV, moto_s3
from test_sweep import SWEEP, TINY, _starts

from tsrec.config import ConfigError, load_config
from tsrec.tune.results import read_results_csv

REPO = Path(__file__).resolve().parents[2]
PREFIX = "sweeps/s3"  # tune.storage_path = s3://<bucket>/sweeps/s3
# No teacher, no decoding (metric valid_loss), 2 trials one at a time, FIFO (no trial is stopped early), 6 steps with
# a checkpoint every 2: the second trial is killed after its first checkpoint reached the bucket.
S3_SWEEP = ["tune.dir=tune_s3", "tune.space={sft.lr: {grid: [3.0e-3, 1.0e-3]}}", "tune.metric=valid_loss",
            "tune.mode=min", "tune.max_concurrent_trials=1", "tune.valid_sample_size=0", "tune.scheduler.type=fifo",
            "sa_init.depth=0", "sft.use_ts_align=false", "sft.max_steps=6", "pipeline.stages=[data,sid,model,sft,eval]"]
# The test's driver: joins the session cluster with the workers' environment (S3 credentials included), as
# `ray job submit --runtime-env-json` would, then runs `tsrec tune`.
DRIVER = ("import json, sys; import ray; "
          "ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False, runtime_env=json.loads(sys.argv[2])); "
          "from tsrec.cli import main; sys.exit(main(sys.argv[3:]))")


@pytest.fixture(scope="module")
def s3_ray(ray_cluster):
    """A moto S3 server; the Ray workers get its test credentials through a re-joined runtime_env (restored after)."""
    import logging

    import ray

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: one INFO line per request
    previous = dict(ray.get_runtime_context().runtime_env or {})
    with moto_s3() as s3:
        ray.shutdown()
        env = {"env_vars": {**previous.get("env_vars", {}), **S3_TEST_ENV}}
        ray.init(address=ray_cluster["address"], configure_logging=False, log_to_driver=False,
                 runtime_env={**previous, **env})
        try:
            yield {**s3, "runtime_env": env, "address": ray_cluster["address"]}
        finally:
            ray.shutdown()
            ray.init(address=ray_cluster["address"], configure_logging=False, log_to_driver=False, runtime_env=previous)


def _keys(s3, prefix: str) -> list[str]:
    return [o["Key"] for page in s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
            for o in page.get("Contents", [])]


def _bucket_status(s3) -> dict[str, str]:
    """Trial id -> status in the experiment state Tune saved in the bucket (what a restore starts from)."""
    out = {}
    for key in _keys(s3, f"{PREFIX}/ray/"):
        if "/experiment_state" in key and key.endswith(".json"):
            try:
                data = json.loads(s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read())
            except ValueError:
                continue
            for trial_json, _ in data["trial_data"]:
                t = json.loads(trial_json)
                out[t["trial_id"]] = t["status"]
    return out


def _cfg(root, s3, *extra):
    return load_config(SWEEP, [f"run.out_dir={root}", *TINY, *S3_SWEEP, f"tune.storage_path=s3://{s3['bucket']}/{PREFIX}",
                               f"run.storage_endpoint={s3['endpoint']}", *extra])


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_in_a_bucket_resumes_from_it(s3_ray, tmp_path):
    from tsrec.orchestration.train import copy_tree
    from tsrec.orchestration.tune import run_tune
    from tsrec.train.metrics import read_metrics_csv

    root, s3 = tmp_path / "run", s3_ray
    tune_dir = root / "tune_s3"
    uri = f"s3://{s3['bucket']}/{PREFIX}"
    args = ["tune", "--config", str(SWEEP), f"run.out_dir={root}", *TINY, *S3_SWEEP, f"tune.storage_path={uri}",
            f"run.storage_endpoint={s3['endpoint']}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # os.environ holds the S3 credentials (moto_s3)
    root.mkdir()
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, s3["address"], json.dumps(s3["runtime_env"]), *args],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # Kill once the bucket's experiment state has a finished trial and a later trial's Ray Train run has
            # registered a checkpoint in the bucket (its checkpoint manager snapshot, what a resumed run loads).
            # Polls the bucket and the markers; the bound only catches a hung sweep.
            deadline, killed_at = time.time() + 1200, None
            while proc.poll() is None and time.time() < deadline:
                done = {t for t, s in _bucket_status(s3).items() if s == "TERMINATED"}
                running = set(_starts(tune_dir)) - done
                snapshots = [f"{PREFIX}/trials/trial-{t}/checkpoint_manager_snapshot.json" for t in running]
                if done and any(k in _keys(s3, k) for k in snapshots):
                    killed_at = (done, running)
                    break
                time.sleep(0.5)
            assert proc.poll() is None and killed_at, f"the sweep ended before it could be killed; see {log.name}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    done_at_kill, running_at_kill = killed_at
    (interrupted,) = running_at_kill
    before = _starts(tune_dir)
    assert len(before) == 2 and all(n == 1 for n in before.values()), before
    # Nothing of the experiment or the trials' runs on local disk: they are in the bucket.
    assert not (tune_dir / "ray").exists() and not (tune_dir / "trials").exists(), sorted(os.listdir(tune_dir))
    assert json.loads((tune_dir / "sweep.json").read_text())["experiment"].startswith(f"{uri}/ray/sweep-")

    # The same command again (in this process): restored from the bucket.
    lines: list[str] = []
    summary = run_tune(_cfg(root, s3), log=lines.append)
    after = _starts(tune_dir)
    assert any(f"resuming the sweep in {uri}/ray/sweep-{summary['sweep']}" in line for line in lines), lines[:5]
    assert all(after[t] == 1 for t in done_at_kill), (done_at_kill, after)  # the finished trial: not started again
    assert after[interrupted] == 2, after  # the interrupted one: once more
    rows = {r["trial_id"]: r for r in read_results_csv(tune_dir / "results.csv")}
    assert set(rows) == set(after) and summary["errors"] == 0 and summary["trials"] == 2, rows
    assert all(r["steps_run"] == "6" and r["best_valid_loss"] for r in rows.values()), rows
    # The interrupted trial's TorchTrainer resumed from its checkpoint in the bucket, not from step 0.
    copy_tree(f"{uri}/trials/trial-{interrupted}/artifacts/logs", str(tmp_path / "logs"), s3["endpoint"])
    metrics = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    resumed_at = {r["attempt/start_step"] for r in metrics} - {0}
    assert len(resumed_at) == 1 and min(resumed_at) >= 2, metrics
    ckpt = min(resumed_at) - 1
    assert {r["attempt/start_step"] for r in metrics if r["step"] <= ckpt} == {0}
    assert {r["attempt/start_step"] for r in metrics if r["step"] > ckpt} == {ckpt + 1}

    # The bucket holds the experiment and both trials' runs (checkpoints, models); the local folder does not.
    keys = _keys(s3, f"{PREFIX}/")
    assert f"{PREFIX}/ray/sweep-{summary['sweep']}/tuner.pkl" in keys, keys[:20]
    for t in rows:
        assert any(k.startswith(f"{PREFIX}/trials/trial-{t}/checkpoint_") for k in keys), t
        assert f"{PREFIX}/trials/trial-{t}/artifacts/final/config.json" in keys, t
    assert not (tune_dir / "ray").exists() and not (tune_dir / "trials").exists()
    # best_model/ was fetched from the best trial's folder in the bucket
    source = json.loads((tune_dir / "best_model.json").read_text())
    assert source["trial_id"] == summary["best_trial"] and source["source"] in ("best", "final")
    key = f"{PREFIX}/trials/trial-{summary['best_trial']}/artifacts/{source['source']}/model.safetensors"
    remote = s3["client"].get_object(Bucket=s3["bucket"], Key=key)["Body"].read()
    assert (tune_dir / "best_model" / "model.safetensors").read_bytes() == remote
    assert load_config(tune_dir / "best_config.yaml").sft.lr == 3e-3  # the higher lr wins on valid loss

    # The finished sweep run again: restored from the bucket, no trial started, best_model/ not fetched again.
    stamp = (tune_dir / "best_model" / "config.json").stat().st_mtime_ns
    lines.clear()
    again = run_tune(_cfg(root, s3), log=lines.append)
    assert any("resuming the sweep in s3://" in line for line in lines)
    assert _starts(tune_dir) == after
    assert again["best_trial"] == summary["best_trial"] and again["sweep"] == summary["sweep"]
    assert (tune_dir / "best_model" / "config.json").stat().st_mtime_ns == stamp


def test_sweep_identity_does_not_depend_on_storage():
    from tsrec.tune.identity import sweep_identity

    inputs = {"data": {"manifest_sha256": "d0"}}
    base = load_config(SWEEP, ["run.out_dir=/runs/a"]).to_dict()
    moved = load_config(SWEEP, ["run.out_dir=/runs/a", "tune.storage_path=s3://b/p",
                                "run.storage_endpoint=http://minio:9000"]).to_dict()
    assert sweep_identity(moved, inputs) == sweep_identity(base, inputs)


@pytest.mark.parametrize("storage, endpoint, message", [
    ("s4://bucket/p", "", r"tune\.storage_path: unknown storage scheme s4://"),
    ("gs://bucket/p", "http://127.0.0.1:9", r"tune\.storage_path: run\.storage_endpoint is for S3-compatible servers"),
    ("s3://tsrec-ckpt/p", "CLOSED", r"tune\.storage_path: cannot reach 's3://tsrec-ckpt/p' on run\.storage_endpoint="),
    ("s3://no-such-bucket/p", "MOTO", r"tune\.storage_path: bucket 'no-such-bucket' of .* does not exist"),
])
def test_storage_checked_before_anything(tmp_path, monkeypatch, storage, endpoint, message):
    """A storage the sweep cannot use stops it before Ray, data or any trial starts: a ConfigError naming the key."""
    import socket

    import tsrec.orchestration.cluster
    from tsrec.orchestration.tune import run_tune

    def no_ray(*_, **__):
        raise AssertionError("Ray was joined before the storage was checked")

    monkeypatch.setattr(tsrec.orchestration.cluster, "ensure_ray", no_ray)

    with moto_s3() as s3:
        if endpoint == "CLOSED":  # a port nothing listens on
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
        elif endpoint == "MOTO":
            endpoint = s3["endpoint"]
        cfg = load_config(SWEEP, [f"run.out_dir={tmp_path}", f"tune.storage_path={storage}",
                                  f"run.storage_endpoint={endpoint}"])
        with pytest.raises(ConfigError, match=message):
            run_tune(cfg)
    assert not any(tmp_path.iterdir())  # no data, no logs, no tune folder
