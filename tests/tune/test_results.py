"""Issue 20: sweeps with seeds as a dimension. Trials are grouped into settings (every swept key but run.seed):
mean, sample std and 95% interval over seeds, the "within seed spread" mark, the best setting and the best trial
inside it, settings.csv / results.md, the plots. Pure Python on hand-built trial records (no Ray)."""

import random
from pathlib import Path

import pytest

from tsrec.config import load_config
from tsrec.tune.results import (MARK_BEST, MARK_WITHIN, best_grid, best_setting, best_trial, read_results_csv,
                                seed_stats, setting_rows, short_names, t_quantile_975, trial_rows, write_best_config,
                                write_results)

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs" / "sweeps" / "demo.yaml"
M = "valid_ndcg@10"
DEPTH, WEIGHT = "sa_init.depth", "sft.tasks.ts_align.loss_weight"


def _trial(tid, depth, weight, seed, best, loss=1.0):
    """A finished trial whose best valid NDCG@10 is ``best`` (at step 4; step 2 is lower)."""
    params = {DEPTH: depth, WEIGHT: weight, **({} if seed is None else {"run.seed": seed})}
    return {"trial_id": tid, "params": params, "finished": True, "error": None, "wall_s": 1.0, "max_steps": 4,
            "history": [{"steps": 2, M: 0.0, "valid_loss": 9.0}, {"steps": 4, M: best, "valid_loss": loss}]}


def _seeded():
    """Four settings x seeds 42, 1, 2 (hand-computed, see the tests):
    A depth 3 w 1.0: 0.30 0.34 0.32 -> mean 0.32, std 0.02            (the best setting)
    B depth 0 w 1.0: 0.36 0.24 0.30 -> mean 0.30, std 0.06  |0.02| < 0.06: within seed spread
    C depth 0 w 0.0: 0.20 0.22 0.21 -> mean 0.21, std 0.01  |0.11| >= 0.02: not marked
    D depth 3 w 0.0: 0.305 0.295 0.30 -> mean 0.30, std 0.005  |0.02| < max(0.005, 0.02) is false: not marked
    B's seed 42 (0.36) is the best single trial of the sweep, but B is not the best setting."""
    values = {"A": (3, 1.0, (0.30, 0.34, 0.32)), "B": (0, 1.0, (0.36, 0.24, 0.30)),
              "C": (0, 0.0, (0.20, 0.22, 0.21)), "D": (3, 0.0, (0.305, 0.295, 0.30))}
    return [_trial(f"{name}{seed}", d, w, seed, v)
            for name, (d, w, vals) in values.items() for seed, v in zip((42, 1, 2), vals)]


def _by_setting(settings):
    return {(s[DEPTH], s[WEIGHT]): s for s in settings}


def test_t_quantiles():
    """The table's two-sided 95% t quantiles, and the rule between rows: the next smaller df (never narrower)."""
    assert t_quantile_975(1) == 12.7062 and t_quantile_975(2) == 4.3027 and t_quantile_975(9) == 2.2622
    assert t_quantile_975(35) == t_quantile_975(30) == 2.0423 and t_quantile_975(1000) == 1.9799
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_t_table_against_the_t_distribution():
    """Each table entry is the 0.975 quantile of Student's t to 4 decimals (mpmath, installed with torch)."""
    mp = pytest.importorskip("mpmath")
    from tsrec.tune.results import _T975

    for df, q in _T975.items():
        cdf = 1 - 0.5 * mp.betainc(df / 2, 0.5, 0, df / (q * q + df), regularized=True)
        assert abs(float(cdf) - 0.975) < 2e-5, df


def test_seed_stats_by_hand():
    # mean 0.32; sample std sqrt((0.02^2 + 0.02^2 + 0) / 2) = 0.02 (population std would be 0.016330);
    # 95% interval 0.32 -/+ 4.3027 * 0.02 / sqrt(3) = 0.32 -/+ 0.049683
    assert seed_stats([0.30, 0.34, 0.32]) == {"n": 3, "mean": 0.32, "std": 0.02, "ci95_low": 0.270317,
                                              "ci95_high": 0.369683}
    # two values: std sqrt(0.1^2 + 0.1^2) = 0.141421; t(0.975, 1) = 12.7062; 0.5 -/+ 12.7062 * 0.141421 / sqrt(2)
    # = 0.5 -/+ 1.27062
    assert seed_stats([0.4, 0.6]) == {"n": 2, "mean": 0.5, "std": 0.141421, "ci95_low": -0.77062,
                                      "ci95_high": 1.77062}
    assert seed_stats([0.4]) == {"n": 1, "mean": 0.4, "std": None, "ci95_low": None, "ci95_high": None}
    assert seed_stats([])["mean"] is None


def test_settings_table_mean_std_interval_and_mark():
    settings = setting_rows(_seeded(), M, "max")
    # B and D tie on the mean (0.30) with n 3 each: D's smaller std (0.005 < 0.06) comes first
    assert [s["setting"] for s in settings] == ["depth=3 loss_weight=1.0", "depth=3 loss_weight=0.0",
                                                "depth=0 loss_weight=1.0", "depth=0 loss_weight=0.0"]
    a, b, c, d = (_by_setting(settings)[k] for k in ((3, 1.0), (0, 1.0), (0, 0.0), (3, 0.0)))
    assert (a["n"], a[f"mean_{M}"], a[f"std_{M}"], a["ci95_low"], a["ci95_high"]) == (3, 0.32, 0.02, 0.270317, 0.369683)
    assert (b["n"], b[f"mean_{M}"], b[f"std_{M}"], b["ci95_low"], b["ci95_high"]) == (3, 0.3, 0.06, 0.15095, 0.44905)
    assert (c[f"mean_{M}"], c[f"std_{M}"]) == (0.21, 0.01) and (d[f"mean_{M}"], d[f"std_{M}"]) == (0.3, 0.005)
    # B: |0.30 - 0.32| = 0.02 < max(0.06, 0.02); D: 0.02 < max(0.005, 0.02) is false (strict); C: 0.11 >= 0.02
    assert (a["mark"], b["mark"], c["mark"], d["mark"]) == (MARK_BEST, MARK_WITHIN, "", "")
    assert a["seeds"] == "1 2 42" and a["best_trial"] == "A1" and a["trial_ids"].split() == ["A1", "A2", "A42"]


def test_best_trial_is_the_best_of_the_best_setting(tmp_path):
    """B's seed 42 (0.36) beats every trial of A, but A is the best setting: best_model and best_config.yaml come
    from A's best seed (A1, 0.34), and the config keeps its seed, so `tsrec run` trains that trial again."""
    trials = _seeded()
    assert trial_rows(trials, M, "max")[0]["trial_id"] == "B42"
    assert best_setting(trials, M, "max")["setting"] == "depth=3 loss_weight=1.0"
    best = best_trial(trials, M, "max")
    assert best["trial_id"] == "A1" and best["params"]["run.seed"] == 1
    base = load_config(SWEEP).to_dict()
    cfg = write_best_config(base, best["params"], tmp_path / "best_config.yaml")
    assert cfg.run.seed == 1 and cfg.sa_init.depth == 3 and cfg.run.data_seed == 42
    assert "run.seed 1 trains on the sweep's data" in (tmp_path / "best_config.yaml").read_text()
    # `tsrec run` of it finds the sweep's upstream stages up to date (built by the base config, seed 42) and
    # trains its own seed: the stage hashes agree up to semantics and differ from model on
    from tsrec.config import load_config as load
    from tsrec.orchestration.pipeline import _config_hash

    sweep_base = load(SWEEP)
    for stage in ("data", "sid", "semantics"):
        assert _config_hash(cfg, stage) == _config_hash(sweep_base, stage), stage
    assert _config_hash(cfg, "model") != _config_hash(sweep_base, "model")


def test_setting_ties():
    """Equal means: more trials with a metric first, then the smaller std, then the setting's best trial in the
    trial ranking (its valid loss); the same in any order Tune lists the trials."""
    def sweep(order):
        trials = [
            _trial("x42", 0, 0.0, 42, 0.5, loss=2.0), _trial("x1", 0, 0.0, 1, 0.5, loss=2.0),    # n 2, std 0
            _trial("y42", 3, 0.0, 42, 0.5, loss=1.0), _trial("y1", 3, 0.0, 1, 0.5, loss=1.0),    # n 2, std 0, loss 1
            _trial("z42", 0, 1.0, 42, 0.6), _trial("z1", 0, 1.0, 1, 0.4), _trial("z2", 0, 1.0, 2, 0.5),  # n 3
            _trial("v42", 3, 1.0, 42, 0.45), _trial("v1", 3, 1.0, 1, 0.55),                      # n 2, std 0.0707
        ]
        return [s["setting"] for s in setting_rows([trials[i] for i in order], M, "max")]

    expected = ["depth=0 loss_weight=1.0", "depth=3 loss_weight=0.0", "depth=0 loss_weight=0.0",
                "depth=3 loss_weight=1.0"]  # z: n 3; y before x: lower valid loss; v: larger std
    rng = random.Random(0)
    for _ in range(20):
        order = list(range(9))
        rng.shuffle(order)
        assert sweep(order) == expected, order


def test_sweep_without_seeds_has_one_trial_per_setting(tmp_path):
    """No run.seed: n 1, no std/interval, no mark; the best setting's trial is the best trial. Trials with equal
    values ran the same seed: they stay separate settings, labelled with their trial id."""
    trials = [_trial("a", 0, 0.0, None, 0.3), _trial("b", 3, 1.0, None, 0.4), _trial("c", 3, 0.0, None, 0.05),
              _trial("d", 3, 0.0, None, 0.1)]
    settings = setting_rows(trials, M, "max")
    assert [s["best_trial"] for s in settings] == [r["trial_id"] for r in trial_rows(trials, M, "max")]
    assert all(s["n"] == 1 and s[f"std_{M}"] is None and s["ci95_low"] is None and s["mark"] == "" and s["seeds"] == ""
               for s in settings)
    assert [s["setting"] for s in settings][-2:] == ["depth=3 loss_weight=0.0 [d]", "depth=3 loss_weight=0.0 [c]"]
    assert best_trial(trials, M, "max")["trial_id"] == "b"
    base = load_config(SWEEP).to_dict()
    write_results(trials, M, "max", base, tmp_path)
    written = read_results_csv(tmp_path / "settings.csv")
    assert written[0]["setting"] == "depth=3 loss_weight=1.0" and len(written) == 4
    cols = list(written[0])
    assert cols[:3] == ["setting", DEPTH, WEIGHT] and "run.seed" not in cols
    for png in ("metric_vs_step.png", "settings.png", "best_by_depth_weight.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_min_mode_ranks_the_lowest_mean_first():
    trials = [{**_trial(f"{d}{s}", d, 0.0, s, 0.0), "history": [{"steps": 4, "valid_loss": v}]}
              for d, vals in ((0, (1.0, 1.2)), (3, (0.9, 1.5))) for s, v in zip((42, 1), vals)]
    trials.append({**_trial("failed", 1, 0.0, 42, 0.0), "history": [], "error": "boom"})  # no metric: last
    settings = setting_rows(trials, "valid_loss", "min")
    assert [s["mean_valid_loss"] for s in settings] == [1.1, 1.2, None]
    assert settings[1]["mark"] == MARK_WITHIN  # |1.2 - 1.1| < max(0.424264, 0.141421)
    assert best_trial(trials, "valid_loss", "min")["trial_id"] == "042"  # the lower of setting depth 0


def test_results_files_and_plots(tmp_path, monkeypatch):
    """results.md: the settings table first, the trials after; settings.csv best first; the plots: one colour per
    setting in metric_vs_step.png, seed dots and interval bars in settings.png, per-setting means in the heatmap."""
    import matplotlib.figure
    import matplotlib.pyplot as plt

    figures = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, path, *a, **kw):
        figures[Path(path).name] = fig
        return real_savefig(fig, path, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    trials = _seeded()
    for i, t in enumerate(trials):  # a distinct first value per trial: a plotted line names its trial
        t["history"][0][M] = i / 1000
    base = load_config(SWEEP).to_dict()
    rows, settings = write_results(trials, M, "max", base, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert md.index("## Settings") < md.index("| setting |") < md.index("## Trials") < md.index("| trial_id |")
    assert "| depth=3 loss_weight=1.0 | 3 | 1 | 3 | 0.32 | 0.02 | 0.2703 | 0.3697 | best | 1 2 42 | A1 | A1 A2 A42 |" in md
    csv_rows = read_results_csv(tmp_path / "settings.csv")
    assert [r["mark"] for r in csv_rows] == ["best", "", "within seed spread", ""]
    assert len(read_results_csv(tmp_path / "results.csv")) == 12

    ax = figures["metric_vs_step.png"].axes[0]
    by_setting = {}  # setting -> the colours of its trials' lines (a line is found by its values)
    for line in ax.get_lines():
        t = next(t for t in trials if tuple(h[M] for h in t["history"]) == tuple(line.get_ydata()))
        by_setting.setdefault((t["params"][DEPTH], t["params"][WEIGHT]), set()).add(tuple(line.get_color()))
    assert len(ax.get_lines()) == 12 and all(len(c) == 1 for c in by_setting.values())  # seeds share a colour
    assert len({next(iter(c)) for c in by_setting.values()}) == 4  # settings do not
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [s["setting"] for s in settings]

    ax = figures["settings.png"].axes[0]
    dots = sorted(float(y) for coll in ax.collections if len(coll.get_offsets()) == 3 for _, y in coll.get_offsets())
    assert dots == sorted(r[f"best_{M}"] for r in rows)  # one dot per seed, 4 settings x 3
    means = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert [float(m.get_ydata()[0]) for m in means] == [s[f"mean_{M}"] for s in settings]
    bars = [c.lines[2][0].get_segments()[0] for c in ax.containers]  # each error bar: [[x, low], [x, high]]
    assert [(round(float(lo), 6), round(float(hi), 6)) for (_, lo), (_, hi) in bars] == [
        (s["ci95_low"], s["ci95_high"]) for s in settings]
    assert [t.get_text() for t in ax.get_xticklabels()] == [s["setting"] for s in settings]

    # heatmap: per-setting means over seeds (max over trials would show B's lucky 0.36 and A's 0.34)
    texts = sorted(t.get_text() for t in figures["best_by_depth_weight.png"].axes[0].texts)
    assert texts == ["0.210", "0.300", "0.300", "0.320"]
    assert best_grid(settings, M, "max", base, f"mean_{M}")[2] == [[0.21, 0.3], [0.3, 0.32]]
    plt.close("all")


def test_short_names_keep_colliding_keys_apart():
    assert short_names([DEPTH, WEIGHT, "sft.tasks.next_sid.loss_weight", "sft.lr"]) == {
        DEPTH: "depth", WEIGHT: "ts_align.loss_weight", "sft.tasks.next_sid.loss_weight": "next_sid.loss_weight",
        "sft.lr": "lr"}


def test_any_trial_order_gives_the_same_settings():
    """Tune lists trials in no fixed order: the settings table (rows, marks, best trial) does not depend on it."""
    trials = _seeded()
    first = setting_rows(trials, M, "max")
    rng = random.Random(1)
    for _ in range(30):
        rng.shuffle(trials)
        assert setting_rows(trials, M, "max") == first


def test_a_setting_without_any_metric_comes_last(tmp_path):
    """Every seed of a setting failed before its first evaluation: n 0, no mean, ranked last, never the best,
    and the plots still draw (no dots for it)."""
    trials = _seeded()[:3] + [{**_trial(f"E{s}", 0, 0.0, s, 0.0), "history": [], "finished": False, "error": "boom"}
                              for s in (42, 1, 2)]
    settings = setting_rows(trials, M, "max")
    assert [(s["setting"], s["n"], s[f"mean_{M}"], s["mark"]) for s in settings] == [
        ("depth=3 loss_weight=1.0", 3, 0.32, MARK_BEST), ("depth=0 loss_weight=0.0", 0, None, "")]
    assert settings[1]["best_trial"] is None and best_trial(trials, M, "max")["trial_id"] == "A1"
    write_results(trials, M, "max", load_config(SWEEP).to_dict(), tmp_path)
    assert (tmp_path / "settings.png").stat().st_size > 1000
