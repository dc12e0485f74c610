"""Sweeps on the local test cluster: the resource check, the demo sweep (4 TorchTrainer trials), and ASHA +
a killed driver resumed (finished trials are not rerun). Real Ray, DeepSpeed on CPU, tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tsrec.config import load_config
from tsrec.tune.results import read_results_csv
from tsrec.tune.space import TuneResourceError

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs" / "sweeps" / "demo.yaml"
# The demo sweep shrunk to seconds per trial (upstream as tests/e2e: 4 teacher tokens).
TINY = ["data.synthetic.n_items=80", "data.synthetic.n_users=160", "sid.codebook_size=4", "sid.collision=extra_level", "teacher.limit=4",
        "teacher.guided_description_tokens=48", "teacher.guided_max_keywords=6", "sft.max_steps=4",
        "sft.eval_every_steps=2", "sft.save_every_steps=2", "sft.log_every_steps=1", "sft.warmup_steps=0",
        "sft.max_eval_samples=8", "sft.valid_ranking_beams=5", "tune.valid_sample_size=8",
        "tune.scheduler.grace_period=2", "tune.scheduler.max_t=4", "eval.beams=5", "eval.ks=[1,5]",
        "tune.metric=valid_ndcg@5"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


def _cfg(root, *extra):
    return load_config(SWEEP, [f"run.out_dir={root}", *TINY, *extra])


def _starts(tune_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in (tune_dir / "trial_starts").iterdir():
        out[f.name.split(".")[0]] = out.get(f.name.split(".")[0], 0) + 1
    return out


@pytest.mark.ray
def test_resources_checked_before_anything(ray_cluster, root):
    from tsrec.orchestration.tune import run_tune

    cfg = _cfg(root, "tune.max_concurrent_trials=4", "tune.resources.cpus_per_worker=2", "tune.dir=tune_big")
    with pytest.raises(TuneResourceError, match=r"short of CPU: need 8\.2, cluster has 4"):
        run_tune(cfg)
    assert not (root / "data").exists()  # nothing started


@pytest.mark.ray
@pytest.mark.slow
def test_demo_sweep(ray_cluster, root):
    from tsrec.orchestration.tune import run_tune

    cfg = _cfg(root)
    summary = run_tune(cfg)
    tune_dir = root / "tune"
    rows = read_results_csv(tune_dir / "results.csv")
    assert summary["trials"] == len(rows) == 4 and summary["errors"] == 0
    assert {(r["sa_init.depth"], r["sft.tasks.ts_align.loss_weight"]) for r in rows} == {
        ("0", "0.0"), ("0", "1.0"), ("3", "0.0"), ("3", "1.0")}
    assert all(r["best_valid_ndcg@5"] != "" for r in rows)
    # each trial was its own TorchTrainer run (Ray Train run folder per trial), inits shared per depth
    assert len(list((tune_dir / "trials").glob("trial-*"))) == 4
    assert len(list((tune_dir / "inits").iterdir())) == 2
    for png in ("metric_vs_step.png", "best_by_depth_weight.png"):
        assert (tune_dir / png).stat().st_size > 1000
    best = load_config(tune_dir / "best_config.yaml")
    assert best.sa_init.depth == int(rows[0]["sa_init.depth"]) and best.sft.valid_ranking_sample == 0
    assert (tune_dir / "best_model" / "config.json").exists()
    assert sum(_starts(tune_dir).values()) == 4


@pytest.mark.ray
@pytest.mark.slow
def test_asha_and_killed_driver_resumes(ray_cluster, root):
    """3 sequential trials, ASHA on valid loss (lr 1e-8 cannot beat the first trial's loss at step 2); the
    driver is SIGKILLed once the first trial is finished and the second started; the rerun resumes."""
    from tsrec.orchestration.tune import run_tune

    extra = ["tune.dir=tune_asha", "tune.space={sft.lr: {grid: [3.0e-3, 1.0e-8, 1.0e-8]}}", "tune.metric=valid_loss",
             "tune.mode=min", "tune.max_concurrent_trials=1", "tune.export_best=false"]
    tune_dir = root / "tune_asha"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "tsrec.cli", "tune", "--config", str(SWEEP), f"run.out_dir={root}", *TINY, *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            starts = _starts(tune_dir) if (tune_dir / "trial_starts").exists() else {}
            states = list((tune_dir / "ray" / "sweep").glob("experiment_state*.json"))
            done = sum(s.read_text().count("TERMINATED") for s in states)
            if len(starts) >= 2 and done >= 1:
                break
            time.sleep(1)
        assert proc.poll() is None, "the sweep ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    before = _starts(tune_dir)
    summary = run_tune(_cfg(root, *extra))  # the same command again: restores the sweep
    after = _starts(tune_dir)
    rows = {r["trial_id"]: r for r in read_results_csv(tune_dir / "results.csv")}
    assert len(rows) == 3 and summary["errors"] == 0
    finished_first = [t for t, n in before.items() if rows[t]["status"] in ("finished", "stopped") and after[t] == n]
    assert finished_first, (before, after)  # a trial finished before the kill was not started again
    assert sum(after.values()) < sum(before.values()) + 3  # not every trial rerun
    assert any(r["stopped_early"] == "True" for r in rows.values()), rows  # ASHA stopped at least one
    assert json.loads((tune_dir / "summary.json").read_text())["stopped_early"] >= 1
