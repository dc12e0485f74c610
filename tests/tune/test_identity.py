"""Issue 20: a sweep's identity picks its experiment (a changed sweep never resumes the old one), model inits are
keyed on what they are built from, and equal metrics are ranked the same way whatever order Tune lists trials in.
Pure functions and the driver's experiment choice; no Ray."""

import itertools
import json
from pathlib import Path

from tsrec.config import load_config
from tsrec.orchestration.tune import _claim
from tsrec.tune.identity import experiment_dir, fingerprint, sweep_identity, upstream_fingerprints
from tsrec.tune.results import best_trial, trial_rows, write_best_config
from tsrec.tune.space import init_key

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs" / "sweeps" / "demo.yaml"
INPUTS = {"data": {"manifest_sha256": "d0"}, "sids": {"manifest_sha256": "s0"},
          "semantics": {"manifest_sha256": "m0"}, "teacher_file": {"sha256": "t0"}}


def _base(*overrides):
    return load_config(SWEEP, ["run.out_dir=/runs/a", *overrides]).to_dict()


def _trial(tid, ndcg, loss, depth=0):
    return {"trial_id": tid, "params": {"sa_init.depth": depth}, "finished": True, "error": None, "wall_s": 1.0,
            "max_steps": 4, "history": [{"steps": 2, "valid_ndcg@10": 0.0, "valid_loss": 9.0},
                                        {"steps": 4, "valid_ndcg@10": ndcg, "valid_loss": loss}]}


def test_equal_metrics_rank_the_same_in_any_trial_order(tmp_path):
    """Four trials tie on NDCG: the valid loss at the best step decides, then the values, then the trial id.
    Every order Tune could list them in gives the same table and the same best trial; the best config written
    again is the same bytes and the file is left alone."""
    trials = [_trial("t3", 0.5, 2.0, depth=3), _trial("t1", 0.5, 1.0, depth=3), _trial("t2", 0.5, 1.0, depth=0),
              _trial("t0", 0.5, 1.0, depth=0), _trial("t9", 0.1, 0.1)]
    expected = ["t0", "t2", "t1", "t3", "t9"]  # loss 1.0 before 2.0; depth 0 before 3; t0 before t2; worse last
    for order in itertools.permutations(trials):
        rows = trial_rows(list(order), "valid_ndcg@10", "max")
        assert [r["trial_id"] for r in rows] == expected, [t["trial_id"] for t in order]
        assert best_trial(list(order), "valid_ndcg@10", "max")["trial_id"] == "t0"
    base = _base()
    path = tmp_path / "best_config.yaml"
    write_best_config(base, trials[3]["params"], path)
    first, stamp = path.read_bytes(), path.stat().st_mtime_ns
    write_best_config(base, best_trial(trials[::-1], "valid_ndcg@10", "max")["params"], path)
    assert path.read_bytes() == first and path.stat().st_mtime_ns == stamp


def test_sweep_identity_follows_what_decides_the_trials():
    same = sweep_identity(_base(), INPUTS)
    assert sweep_identity(_base(), dict(reversed(list(INPUTS.items())))) == same  # key order does not count
    # where outputs go and what happens after the trials: the same sweep
    for o in ("run.out_dir=/elsewhere", "tune.dir=tune2", "tune.export_best=false", "tune.eval_test=true",
              "tune.max_concurrent_trials=1", "sft.log_every_steps=1"):
        assert sweep_identity(_base(o), INPUTS) == same, o
    # the space, the base config a trial runs, the scheduler, the search, the upstream inputs: another sweep
    changed = ["tune.space={sa_init.depth: {grid: [0, 3]}}",
               ("tune.space={sa_init.depth: {grid: [0, 2]}, sft.tasks.ts_align.loss_weight: {grid: [0.0, 1.0]}}"),
               "sft.max_steps=4", "sft.lr=1e-3",
               "tune.scheduler.grace_period=2", "tune.search=random", "tune.num_samples=2", "tune.metric=valid_ndcg@5",
               "run.seed=1"]
    ids = {sweep_identity(_base(o), INPUTS) for o in changed}
    assert same not in ids and len(ids) == len(changed)
    for name in INPUTS:
        assert sweep_identity(_base(), {**INPUTS, name: {"manifest_sha256": "new"}}) != same, name


def test_changed_sweep_starts_a_new_experiment(tmp_path):
    """The driver's choice of experiment folder: the same sweep gets its folder back (Tune restores it); a changed
    space gets another folder, the old experiment is kept and the old sweep's outputs are removed from <tune>/."""
    tune_dir, log = tmp_path / "tune", []
    base, changed = _base(), _base("tune.space={sa_init.depth: {grid: [0, 3]}}", "sft.max_steps=4")
    old = _claim(tune_dir, sweep_identity(base, INPUTS), {"config": base}, log.append)
    old.mkdir(parents=True)
    (old / "experiment_state-x.json").write_text("{}")  # what Tuner.can_restore looks for
    for name in ("results.csv", "best_config.yaml", "summary.json"):
        (tune_dir / name).write_text("old sweep")
    (tune_dir / "best_model").mkdir()
    assert _claim(tune_dir, sweep_identity(base, INPUTS), {"config": base}, log.append) == old  # same: resumes
    assert (tune_dir / "results.csv").exists() and not log

    new = _claim(tune_dir, sweep_identity(changed, INPUTS), {"config": changed}, log.append)
    assert new != old and new == experiment_dir(tune_dir, sweep_identity(changed, INPUTS))
    assert not new.exists() and (old / "experiment_state-x.json").exists()  # a fresh experiment; the old one kept
    assert not any((tune_dir / n).exists() for n in ("results.csv", "best_config.yaml", "summary.json", "best_model"))
    recorded = json.loads((tune_dir / "sweep.json").read_text())
    assert recorded["identity"] == sweep_identity(changed, INPUTS) and recorded["config"]["sft"]["max_steps"] == 4
    assert "the sweep changed" in log[0]


def test_init_key_follows_sids_and_teacher_file(tmp_path):
    """An init is built from the model/sa_init sections, the seed, the SIDs and the teacher file: each one changed
    names another init, so new SIDs or semantics never reuse an init built from the old ones."""
    root = tmp_path / "run"
    (root / "sids").mkdir(parents=True)
    (root / "sids" / "manifest.json").write_text('{"stage": "sid", "created_unix": 1}')
    (root / "semantics").mkdir()
    (root / "semantics" / "description_keywords.json").write_text("[]")
    cfg = load_config(SWEEP)
    key = init_key(cfg, upstream_fingerprints(root))
    assert key.startswith("depth3-") and init_key(cfg, upstream_fingerprints(root)) == key
    assert init_key(load_config(SWEEP, ["run.seed=7"]), upstream_fingerprints(root)) != key
    assert init_key(load_config(SWEEP, ["model.tiny_layers=3"]), upstream_fingerprints(root)) != key
    assert init_key(load_config(SWEEP, ["sft.lr=1e-3"]), upstream_fingerprints(root)) == key  # not an init input
    (root / "semantics" / "description_keywords.json").write_text('[{"token": "<a_1>"}]')  # new teacher records
    key2 = init_key(cfg, upstream_fingerprints(root))
    (root / "sids" / "manifest.json").write_text('{"stage": "sid", "created_unix": 2}')  # SIDs rebuilt
    key3 = init_key(cfg, upstream_fingerprints(root))
    assert len({key, key2, key3}) == 3
    assert fingerprint(root / "missing") is None


def test_best_model_is_copied_again_only_when_it_changed(tmp_path):
    """A rerun of a finished sweep exports the same best trial's folder: best_model/ is left as it is; another best
    trial (or a changed source folder) is copied."""
    from tsrec.orchestration.tune import _export_best

    tune_dir = tmp_path / "tune"
    for tid in ("a", "b"):
        best = tune_dir / "trials" / f"trial-{tid}" / "artifacts" / "best"
        best.mkdir(parents=True)
        (best / "config.json").write_text(json.dumps({"trial": tid}))
    dest, copied = _export_best({"trial_id": "a"}, tune_dir)
    assert copied and json.loads((dest / "config.json").read_text()) == {"trial": "a"}
    stamp = (dest / "config.json").stat().st_mtime_ns
    assert _export_best({"trial_id": "a"}, tune_dir) == (dest, False)
    assert (dest / "config.json").stat().st_mtime_ns == stamp
    assert _export_best({"trial_id": "b"}, tune_dir) == (dest, True)
    assert json.loads((dest / "config.json").read_text()) == {"trial": "b"}
    (tune_dir / "trials" / "trial-b" / "artifacts" / "best" / "model.safetensors").write_bytes(b"new weights")
    assert _export_best({"trial_id": "b"}, tune_dir) == (dest, True) and (dest / "model.safetensors").exists()
