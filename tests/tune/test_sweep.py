"""Sweeps on the local test cluster: the resource check; ASHA + a killed driver resumed (finished trials are not
rerun), then the finished sweep run again (same best trial, same files); the demo sweep (4 TorchTrainer trials, depth x TS-Align weight). Real Ray, DeepSpeed on CPU, tiny model."""

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
        "sft.eval_every_steps=2", "sft.save_every_steps=2", "sft.log_every_steps=2", "sft.warmup_steps=0",
        "sft.max_eval_samples=8", "sft.valid_ranking_beams=5", "tune.valid_sample_size=8",
        "tune.scheduler.grace_period=2", "tune.scheduler.max_t=4", "eval.beams=5", "eval.ks=[1,5]",
        "tune.metric=valid_ndcg@5", "model.tiny_vocab=bpe",
        "tune.space={sa_init.depth: {grid: [0, 3]}, sft.tasks.ts_align.loss_weight: {grid: [0.0, 1.0]}}"]
# ASHA + resume: no teacher (depth 0, no TS-Align) and no decoding (metric valid_loss), so only data, SIDs and
# one init come before the trials. Four trials one at a time; lr 1e-8 cannot match lr 3e-3's valid loss at
# step 2, and whichever trial the driver dies in, a 1e-8 trial meets a better recorded one at ASHA's rung 2
# (the scheduler's rungs are not part of Tune's saved state, so they start empty after the restore).
ASHA = ["tune.dir=tune_asha", "tune.scheduler.type=asha", "tune.space={sft.lr: {grid: [3.0e-3, 1.0e-8, 3.0e-3, 1.0e-8]}}", "tune.metric=valid_loss",
        "tune.mode=min", "tune.max_concurrent_trials=1", "tune.valid_sample_size=0", "sa_init.depth=0",
        "sft.use_ts_align=false", "pipeline.stages=[data,sid,model,sft,eval]"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sweep")


def _cfg(root, *extra):
    return load_config(SWEEP, [f"run.out_dir={root}", *TINY, *extra])


def _starts(tune_dir: Path) -> dict[str, int]:
    """Trial id -> how many times its trainable started (one marker file per start)."""
    out: dict[str, int] = {}
    folder = tune_dir / "trial_starts"
    for f in folder.iterdir() if folder.exists() else []:
        out[f.name.split(".")[0]] = out.get(f.name.split(".")[0], 0) + 1
    return out


def _saved_status(tune_dir: Path) -> dict[str, str]:
    """Trial id -> status in Tune's saved experiment state (what a restore starts from)."""
    out = {}
    for state in (tune_dir / "ray").glob("sweep-*/experiment_state*.json"):  # the sweep's identity names it
        try:
            data = json.loads(state.read_text())
        except (ValueError, OSError):  # being rewritten right now: read it at the next poll
            continue
        for trial_json, _ in data["trial_data"]:
            t = json.loads(trial_json)
            out[t["trial_id"]] = t["status"]
    return out


@pytest.mark.ray
def test_resources_checked_before_anything(ray_cluster, root):
    from tsrec.orchestration.tune import run_tune

    cfg = _cfg(root, "tune.max_concurrent_trials=4", "tune.resources.cpus_per_worker=2", "tune.dir=tune_big")
    with pytest.raises(TuneResourceError, match=r"short of CPU: need 8\.2, cluster has 4"):
        run_tune(cfg)
    assert not (root / "data").exists()  # nothing started


@pytest.mark.ray
def test_asha_stops_early_and_killed_driver_resumes(ray_cluster, root):
    """`tsrec tune` in a subprocess, SIGKILLed once Tune has saved a trial as done and a later one has started;
    the same sweep run again resumes: done trials keep their results and are not started again."""
    from tsrec.orchestration.tune import run_tune

    tune_dir = root / "tune_asha"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"], "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "tsrec.cli", "tune", "--config", str(SWEEP), f"run.out_dir={root}", *TINY, *ASHA]
    log = open(root / "asha_driver.log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Polls files the sweep writes (no fixed sleep decides anything); the bound only catches a hung sweep.
        deadline = time.time() + 1200
        while proc.poll() is None and time.time() < deadline:
            done = {t for t, s in _saved_status(tune_dir).items() if s == "TERMINATED"}
            if done and set(_starts(tune_dir)) - done:
                break
            time.sleep(0.5)
        assert proc.poll() is None, f"the sweep ended before it could be killed; see {log.name}"
        done_at_kill = {t for t, s in _saved_status(tune_dir).items() if s == "TERMINATED"}
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    before = _starts(tune_dir)
    assert done_at_kill and len(before) < 4, before  # killed mid-sweep
    # a quiet console (no --verbose), as `tsrec run`'s: the sweep's own lines, not Tune's experiment box
    console = (root / "asha_driver.log").read_text()
    assert "[tsrec tune] 4 trial(s)" in console and (root / "logs" / "ray.log").exists()
    assert "View detailed results here" not in console and "Configuration for experiment" not in console, console

    summary = run_tune(_cfg(root, *ASHA))  # the same command again: restores the sweep
    after = _starts(tune_dir)
    rows = {r["trial_id"]: r for r in read_results_csv(tune_dir / "results.csv")}
    assert len(rows) == 4 and summary["errors"] == 0, rows
    assert all(after[t] == before[t] for t in done_at_kill), (done_at_kill, before, after)  # not rerun
    assert all(int(rows[t]["steps_run"]) >= 2 and rows[t]["best_valid_loss"] for t in done_at_kill)  # results kept
    assert set(after) == set(rows)  # every other trial ran after the restore
    # ASHA: at least one lr-1e-8 trial ended at its first rung (step 2 of 4), the lr-3e-3 trials ran to the end
    stopped = [r for r in rows.values() if r["stopped_early"] == "True"]
    assert stopped and all(r["sft.lr"] == "1e-08" and r["steps_run"] == "2" for r in stopped), rows
    assert summary["stopped_early"] == len(stopped)
    # outputs: one TorchTrainer run per trial, the table, both plots, a best config `tsrec run` accepts
    assert len(list((tune_dir / "trials").glob("trial-*"))) == 4
    for png in ("metric_vs_step.png", "best_by_depth_weight.png"):
        assert (tune_dir / png).stat().st_size > 1000
    best = load_config(tune_dir / "best_config.yaml")
    assert best.sft.lr == 3e-3 and best.sft.best_metric == "loss"
    assert (tune_dir / "best_model" / "config.json").exists()

    # The finished sweep run again (issue 20): its two lr-3e-3 trials may tie, yet the same best trial, the same
    # table and best_config.yaml bytes, best_model/ not copied again, no trial started again.
    kept = {f: (tune_dir / f).read_bytes() for f in ("results.csv", "best_config.yaml")}
    model_stamp = (tune_dir / "best_model" / "config.json").stat().st_mtime_ns
    again = run_tune(_cfg(root, *ASHA))
    assert again["best_trial"] == summary["best_trial"] and again["sweep"] == summary["sweep"]
    assert {f: (tune_dir / f).read_bytes() for f in kept} == kept
    assert (tune_dir / "best_model" / "config.json").stat().st_mtime_ns == model_stamp
    assert _starts(tune_dir) == after
    assert json.loads((tune_dir / "sweep.json").read_text())["identity"] == summary["sweep"]


@pytest.mark.ray
@pytest.mark.slow
def test_demo_sweep(ray_cluster, root):
    """The demo sweep as shipped (2 x 2: depth {0, 3} x TS-Align weight {0, 1}), shrunk: ranked on valid
    NDCG@5 from the constrained decoder; the exported model is the best trial's best-NDCG step."""
    from safetensors.torch import load_file

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
    assert best.sa_init.depth == int(rows[0]["sa_init.depth"])
    assert best.sft.best_metric == "ndcg@5" and best.sft.valid_ranking_sample == 8
    # metric -> best trial -> its best-metric model: best_model is that trial's best/ folder
    arts = tune_dir / "trials" / f"trial-{rows[0]['trial_id']}" / "artifacts"
    exported, kept = load_file(tune_dir / "best_model" / "model.safetensors"), load_file(arts / "best" / "model.safetensors")
    assert exported.keys() == kept.keys() and all((exported[k] == kept[k]).all() for k in kept)
    assert sum(_starts(tune_dir).values()) == 4
