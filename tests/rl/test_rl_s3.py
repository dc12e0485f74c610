"""RL checkpoints on an object store: a run with ``rl.storage_path=s3://...`` on a local S3 server (moto, as
tests/scale/test_multinode.py does for SFT) loses its worker after step 2 and resumes from the step-1
checkpoint that exists only in the bucket, ending on the losses of an uninterrupted in-process run.
A Ray Train run with one restart, one worker (~55 s on 2 cores with the Ray head up).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sft"))

from s3_server import S3_TEST_ENV, moto_s3  # noqa: E402
from sft_synth import assert_resumed_after, make_tiny_run  # noqa: E402
from tsrec.config import load_config  # noqa: E402
from tsrec.train.metrics import read_metrics_csv  # noqa: E402

# slow (opt-in: pytest -m slow tests/rl/test_rl_s3.py): the object-store path itself (fit_trainer, ray_storage, the
# endpoint) is the one SFT's default-suite test (tests/sft/test_sft_rerun.py) covers; this adds RL's reference
# weights in the bucket, ~55 s that would take the default suite past 15 minutes on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = ["rl.group_size=4", "rl.prompts_per_step=8", "rl.prompts_per_micro=4", "rl.max_steps=4", "rl.lr=1e-3",
        "rl.warmup_ratio=0", "rl.eval_every_steps=2", "rl.save_every_steps=2", "rl.valid_sample_size=8",
        "rl.eval_beams=4", "rl.title_history_rows=16", "rl.beta=0.01", "rl.ref_sync_every_steps=2",
        "rl.precision=fp32", "rl.zero_stage=2", "rl.max_failures=2", "eval.batch_size=8",
        "resources.rl.workers=1", "resources.rl.cpus_per_worker=1", "run.name=t"]


@pytest.fixture(scope="module")
def s3_ray(ray_cluster):
    """A moto S3 server (``tests/s3_server.py``); the Ray workers get its test credentials through a re-joined
    runtime_env. The session's Ray connection is restored afterwards."""
    import ray

    previous = dict(ray.get_runtime_context().runtime_env or {})
    with moto_s3() as s3:
        ray.shutdown()
        ray.init(address=ray_cluster["address"], configure_logging=False, log_to_driver=False,
                 runtime_env={**previous, "env_vars": {**previous.get("env_vars", {}), **S3_TEST_ENV}})
        try:
            yield s3
        finally:
            ray.shutdown()
            ray.init(address=ray_cluster["address"], configure_logging=False, log_to_driver=False, runtime_env=previous)


def test_rl_resumes_from_an_s3_checkpoint(s3_ray, tmp_path):
    from tsrec.orchestration.rl import run_rl
    from tsrec.rl.loop import train_rl
    from tsrec.runtime import LocalContext

    tiny = make_tiny_run(tmp_path / "tiny")
    # The uninterrupted baseline, in this process (one worker, same seed, fp32: the same steps).
    train_rl(load_config(None, BASE), tiny["model"], tiny["data"], tiny["sids"], None, LocalContext(tmp_path / "base"))
    base = read_metrics_csv(tmp_path / "base" / "logs" / "metrics.csv")

    uri, marker = f"s3://{s3_ray['bucket']}/runs", tmp_path / "killed-once"
    cfg = load_config(None, [*BASE, f"rl.storage_path={uri}", f"run.storage_endpoint={s3_ray['endpoint']}",
                             "rl.fail_at_step=2", f"rl.fail_marker={marker}"])
    result = run_rl(cfg, tiny["model"], tiny["data"], tiny["sids"], None, tmp_path / "out")
    assert marker.exists()  # the first attempt really died after step 2
    rows = read_metrics_csv(tmp_path / "out" / "metrics.csv")
    assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3]
    assert_resumed_after(rows, 1)  # from the step-1 checkpoint, which lives only in the bucket
    for a, b in zip(base, rows):
        for k in ("train/loss", "train/kl", "rollout/reward_mean", "eval/ndcg@10"):
            if k in a or k in b:
                assert abs(a[k] - b[k]) < 1e-4, (a["step"], k, a[k], b[k])
    assert result["storage"] == uri
    keys = [o["Key"] for page in s3_ray["client"].get_paginator("list_objects_v2").paginate(
        Bucket=s3_ray["bucket"], Prefix="runs/") for o in page.get("Contents", [])]
    name = result["name"]
    assert any(k.startswith(f"runs/{name}/checkpoint_") and k.endswith("meta.json") for k in keys), keys
    # The reference was synced after step 1, so the checkpoint carries its weights (restored on resume).
    assert any(k.startswith(f"runs/{name}/checkpoint_") and k.endswith("reference/weights.pt") for k in keys), keys
    assert not (tmp_path / "out" / "ray").exists()  # nothing of the run went to local storage
