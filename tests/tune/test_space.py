"""tune.space parsing, named errors, the resource check and the pure outputs (no Ray)."""

from pathlib import Path

import pytest

from tsrec.config import TuneConfig, load_config
from tsrec.tune.results import best_grid, read_results_csv, trial_rows, write_best_config, write_tables
from tsrec.tune.space import (SweepSpaceError, TuneResourceError, apply_params, check_resources, count_trials, init_key,
                              init_variants, parse_space, sft_best_metric, trial_config)

REPO = Path(__file__).resolve().parents[2]


def _tune(space, **kw):
    return TuneConfig(space=space, **kw)


def test_space_kinds_and_counts():
    t = _tune({"sa_init.depth": {"grid": [0, 3]}, "sft.tasks.ts_align.loss_weight": {"grid": [0, 1]},
               "sft.lr": {"loguniform": [1e-4, 1e-2]}}, search="random", num_samples=3)
    params = parse_space(t)
    assert [(p.key, p.kind) for p in params] == [("sa_init.depth", "grid"), ("sft.tasks.ts_align.loss_weight", "grid"),
                                                 ("sft.lr", "loguniform")]
    assert params[1].values == (0.0, 1.0)  # coerced by the schema (float key)
    assert count_trials(params, t) == 12
    assert init_variants(params) == [{"sa_init.depth": 0}, {"sa_init.depth": 3}]


@pytest.mark.parametrize("space, search, message", [
    ({"sft.lrr": {"grid": [1e-3]}}, "grid", "unknown sweep key 'sft.lrr' (known at sft:"),
    ({"sft.tasks.ts_align": {"grid": [1]}}, "grid", "is a section"),
    ({"sa_init.depth": {"grid": ["deep"]}}, "grid", "sa_init.depth: expected an integer"),
    ({"sft.lr": {"uniform": [1e-3, 1e-4]}}, "random", "lo < hi"),
    ({"sft.lr": {"loguniform": [0, 1e-2]}}, "random", "0 < lo"),
    ({"sft.lr": {"uniform": [1e-4, 1e-3]}}, "grid", "tune.search=grid needs grid entries only"),
    ({"sa_init.depth": {"choice": [0, 3]}, "sft.warmup_steps": {"uniform": [1, 5]}}, "random", "not a float key"),
    ({"sid.codebook_size": {"grid": [8, 16]}}, "grid", "built once and shared"),
    ({"sft.lr": {"grid": []}}, "grid", "non-empty list"),
    ({"sft.lr": {"between": [1, 2]}}, "grid", "expected one of"),
    ({}, "grid", "tune.space: empty"),
])
def test_space_named_errors(space, search, message):
    with pytest.raises(SweepSpaceError, match=None) as e:
        parse_space(_tune(space, search=search))
    assert message in str(e.value)


def test_seeds_are_a_sweep_dimension():
    """run.seed: {grid: [42, 1, 2]} (the one run.* key a sweep may vary): 3 trials per setting, each trial runs
    its seed, and each depth x seed has its own model init (init draws weights from the seed)."""
    t = _tune({"sa_init.depth": {"grid": [0, 3]}, "run.seed": {"grid": [42, 1, 2]}})
    params = parse_space(t)
    assert [(p.key, p.values) for p in params] == [("sa_init.depth", (0, 3)), ("run.seed", (42, 1, 2))]
    assert count_trials(params, t) == 6
    variants = init_variants(params)
    assert len(variants) == 6 and {"sa_init.depth": 3, "run.seed": 1} in variants
    base = load_config(REPO / "configs" / "sweeps" / "demo.yaml").to_dict()
    assert trial_config(base, {"sa_init.depth": 3, "run.seed": 1}).run.seed == 1
    # the driver builds apply_params(base, variant) for each variant; a trial looks up init_key(its config):
    # every trial's init is one the driver built, and the seeds' inits differ
    built = {init_key(apply_params(base, v), None) for v in variants}
    trial_keys = {init_key(trial_config(base, {"sa_init.depth": d, "run.seed": s}), None)
                  for d in (0, 3) for s in (42, 1, 2)}
    assert trial_keys == built and len(built) == 6
    assert parse_space(_tune({"run.seed": {"grid": [1, 2]}, "sft.lr": {"grid": [1e-3]}}, search="random"))


@pytest.mark.parametrize("space, kw, message", [
    ({"run.seed": {"choice": [1, 2]}}, {"search": "random"}, "seeds are a grid dimension"),
    ({"run.seed": {"grid": [1, 1]}}, {}, "run.seed repeat a value"),
    ({"run.seed": {"grid": [1, 2]}, "sft.lr": {"grid": [1e-3, 1e-3]}}, {}, "sft.lr repeat a value"),
    ({"run.seed": {"grid": [1, 2]}}, {"num_samples": 2}, "would repeat every seed"),
    ({"run.seed": {"grid": [1, 2]}, "sft.lr": {"loguniform": [1e-4, 1e-2]}}, {"search": "random"},
     "sft.lr would be drawn anew for every seed"),
    ({"run.seed": {"choice": [1, 2]}}, {"search": "optuna"}, "optuna samples every key"),
    ({"run.seed": {"grid": ["x"]}}, {}, "expected an integer"),
    ({"run.name": {"grid": ["a"]}}, {}, "the sweep driver sets run.*"),
])
def test_seed_sweep_errors(space, kw, message):
    with pytest.raises(SweepSpaceError) as e:
        parse_space(_tune(space, **kw))
    assert message in str(e.value)


def test_resource_check_names_what_is_short():
    t = _tune({"sft.lr": {"grid": [1e-3, 1e-4]}}, max_concurrent_trials=4)
    t.resources.workers, t.resources.cpus_per_worker, t.resources.gpus_per_worker = 2, 1.0, 1.0
    with pytest.raises(TuneResourceError, match=r"short of CPU: need 4\.1, cluster has 4; GPU: need 4, cluster has 0"):
        check_resources(t, 2, {"CPU": 4.0})  # 2 trials at once (only 2 exist) x (2 x 1 CPU + 0.05)
    assert check_resources(t, 2, {"CPU": 8.0, "GPU": 4.0}) == 2
    t.max_concurrent_trials = 0  # as many as fit
    assert check_resources(t, 8, {"CPU": 8.0, "GPU": 4.0}) == 2


def _trials():
    def hist(vals):
        return [{"steps": 4 * (i + 1), "valid_ndcg@10": v} for i, v in enumerate(vals)]

    return [
        {"trial_id": "a", "params": {"sa_init.depth": 0, "sft.tasks.ts_align.loss_weight": 0.0}, "history": hist([0.1, 0.2, 0.3]),
         "finished": True, "error": None, "wall_s": 10.0},
        {"trial_id": "b", "params": {"sa_init.depth": 3, "sft.tasks.ts_align.loss_weight": 1.0}, "history": hist([0.4, 0.35]),
         "finished": True, "error": None, "wall_s": 9.0},
        {"trial_id": "c", "params": {"sa_init.depth": 3, "sft.tasks.ts_align.loss_weight": 0.0}, "history": hist([0.05]),
         "finished": False, "error": None, "wall_s": 3.0},
    ]


def test_results_table_and_best_config(tmp_path):
    rows = trial_rows(_trials(), "valid_ndcg@10", "max")
    assert [r["trial_id"] for r in rows] == ["b", "a", "c"]
    assert rows[0]["best_valid_ndcg@10"] == 0.4 and rows[0]["best_step"] == 4 and rows[0]["steps_run"] == 8
    assert [r["stopped_early"] for r in rows] == [False, False, True]
    write_tables(rows, tmp_path)
    assert [r["trial_id"] for r in read_results_csv(tmp_path / "results.csv")] == ["b", "a", "c"]
    assert "| trial_id |" in (tmp_path / "results.md").read_text()
    base = load_config(REPO / "configs" / "sweeps" / "demo.yaml").to_dict()
    depths, weights, cells = best_grid(rows, "valid_ndcg@10", "max", base)
    assert (depths, weights, cells) == ([0, 3], [0.0, 1.0], [[0.3, None], [0.05, 0.4]])
    cfg = write_best_config(base, {"sa_init.depth": 3, "sft.tasks.ts_align.loss_weight": 1.0}, tmp_path / "best.yaml")
    assert cfg.sa_init.depth == 3 and cfg.sft.tasks.ts_align.loss_weight == 1.0
    # as the trial ran: the probe on and best/ kept by the sweep's metric, so `tsrec run` picks the same way
    assert cfg.sft.valid_ranking_sample == base["tune"]["valid_sample_size"] and cfg.sft.best_metric == "ndcg@10"
    # and on the trial's Ray Train group (demo: 1 worker of 0.9 CPU), not resources.sft's default 2 workers
    assert (cfg.resources.sft.workers, cfg.resources.sft.cpus_per_worker) == (1, 0.9)
    assert "\ntune:" not in (tmp_path / "best.yaml").read_text()
    assert load_config(tmp_path / "best.yaml").run.out_dir == base["run"]["out_dir"]


@pytest.mark.parametrize("overrides, expected", [
    (["tune.metric=valid_ndcg@10", "tune.mode=max"], "ndcg@10"),
    (["tune.metric=valid_hr@5", "tune.mode=max"], "hr@5"),
    (["tune.metric=valid_loss", "tune.mode=min"], "loss"),
    (["tune.metric=valid_ndcg@10", "tune.mode=min"], "higher-is-better: set tune.mode=max"),
    (["tune.metric=valid_loss", "tune.mode=max"], "lower-is-better: set tune.mode=min"),
    (["tune.metric=valid_ndcg@10", "sft.valid_ranking_beams=5"], "expected valid_loss or one of"),
    (["tune.metric=train_loss", "tune.mode=min"], "expected valid_loss or one of"),
    (["tune.valid_sample_size=0"], "needs the valid ranking probe"),
])
def test_sweep_metric_decides_the_trials_best_model(overrides, expected):
    """tune.metric -> sft.best_metric (what each trial keeps as best/): the same number ranks trials and picks
    the exported model; an incoherent metric/mode is a named error before anything runs."""
    cfg = load_config(REPO / "configs" / "sweeps" / "demo.yaml", overrides)
    if "@" in expected or expected == "loss":
        assert sft_best_metric(cfg) == expected
        trial = trial_config(cfg.to_dict(), {"sa_init.depth": 0})
        assert trial.sft.best_metric == expected and trial.sft.valid_ranking_sample == cfg.tune.valid_sample_size
    else:
        with pytest.raises(SweepSpaceError, match=expected):
            sft_best_metric(cfg)


def test_stopped_at_its_last_step_is_not_stopped_early():
    """ASHA may end a trial on its last report (a rung at the last step): it ran every step, so the table must
    not count it as stopped early; a trial ended before its planned steps is."""
    trials = [{"trial_id": t, "params": {"sft.lr": lr}, "history": [{"steps": s, "valid_loss": v} for s, v in hist],
               "finished": False, "error": None, "wall_s": 1.0, "max_steps": 4}
              for t, lr, hist in (("full", 1e-3, [(2, 1.0), (4, 0.5)]), ("cut", 1e-8, [(2, 2.0)]))]
    rows = {r["trial_id"]: r for r in trial_rows(trials, "valid_loss", "min")}
    assert (rows["full"]["status"], rows["full"]["stopped_early"]) == ("stopped", False)
    assert (rows["cut"]["status"], rows["cut"]["stopped_early"]) == ("stopped", True)
