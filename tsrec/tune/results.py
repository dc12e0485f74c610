"""Sweep outputs from plain trial records: results.csv / results.md, settings.csv, the three PNGs, best_config.yaml.

A trial record (built by the orchestration from Ray Tune's ResultGrid, or by a test by hand)::

    {"trial_id": "a1b2", "params": {"sa_init.depth": 3, ...}, "history": [{"steps": 2, "valid_ndcg@10": 0.1, ...}],
     "finished": True, "error": None, "wall_s": 41.2, "max_steps": 8}

A *setting* is the trial's values without ``run.seed``: the trials of one setting differ only by their seed, so
their spread is the sweep's noise (:func:`setting_rows`). A sweep without seeds has one trial per setting.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tsrec.artifacts import atomic_write_text
from tsrec.config import Config, load_config
from tsrec.tune.space import SEED_KEY, get_dotted, trial_config

HEATMAP_ROWS, HEATMAP_COLS = "sa_init.depth", "sft.tasks.ts_align.loss_weight"


def trial_rows(trials: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per trial: its values, best metric (and the step it was reached), steps run, stopped early
    (ended by the scheduler before its last step, without an error), status, wall time. Sorted best first; equal
    metrics are ordered by :func:`_tie_break` (valid loss at the best step, the values, the trial id).

    A record's ``max_steps`` is its planned length (None: the longest any trial ran). A trial the scheduler
    ended at its last report (ASHA compares at a rung equal to the last step) has status "stopped" but ran
    every step, so it is not "stopped early"."""
    keys = sorted({k for t in trials for k in t["params"]})
    longest = max((h.get("steps", 0) for t in trials for h in t["history"]), default=0)
    rows, order = [], []
    for t in trials:
        points = [(h["steps"], h[metric]) for h in t["history"] if metric in h and h[metric] is not None]
        best = (max if mode == "max" else min)(points, key=lambda p: p[1]) if points else None
        order.append(_tie_break(t, metric, None if best is None else best[0]))
        steps = max((h.get("steps", 0) for h in t["history"]), default=0)
        status = "error" if t.get("error") else ("finished" if t.get("finished") else "stopped")
        rows.append({"trial_id": t["trial_id"], **{k: t["params"].get(k) for k in keys},
                     f"best_{metric}": None if best is None else round(float(best[1]), 6),
                     "best_step": None if best is None else best[0], "steps_run": steps,
                     # neither finished nor failed, and short of its planned steps: the scheduler (ASHA) ended it
                     "stopped_early": status == "stopped" and steps < (t.get("max_steps") or longest),
                     "status": status, "wall_s": round(float(t.get("wall_s") or 0.0), 1)})
    sign = -1 if mode == "max" else 1
    keyed = sorted(zip(rows, order), key=lambda ro: (ro[0][f"best_{metric}"] is None,
                                                      sign * (ro[0][f"best_{metric}"] or 0.0), *ro[1]))
    return [r for r, _ in keyed]


def _tie_break(t: dict[str, Any], metric: str, best_step: int | None) -> tuple[float, str, str]:
    """What orders trials whose best ``metric`` is equal (as rounded in the table), so the ranking never depends
    on the order Tune lists its trials in: the valid loss at the trial's best step (lower first; not used when
    the metric is the valid loss itself), then the trial's values as sorted JSON, then the trial id (trials
    with the same values, e.g. repeated samples: Tune numbers a sweep's trials in the order it created them)."""
    loss = float("inf")
    if metric != "valid_loss" and best_step is not None:
        at = [h.get("valid_loss") for h in t["history"] if h.get("steps") == best_step]
        if at and at[0] is not None:
            loss = round(float(at[0]), 6)
    return loss, json.dumps(t["params"], sort_keys=True, default=str), str(t["trial_id"])


# --- settings: the trials of one setting differ only by run.seed --------------------------------------------------

MARK_BEST, MARK_WITHIN = "best", "within seed spread"
# Two-sided 95% Student t quantiles t(0.975, df) for df 1..30, 40, 60, 120 (scipy is not a dependency).
_T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622,
         10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009,
         19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518,
         28: 2.0484, 29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799}


def t_quantile_975(df: int) -> float:
    """t(0.975, df), the 95% interval's multiplier. A df between the table's rows takes the next smaller listed
    df (an interval at most 1% too wide, never too narrow); past 120, the 120 value."""
    if df < 1:
        raise ValueError(f"t quantile: need df >= 1, got {df}")
    return _T975[max(d for d in _T975 if d <= df)]


def seed_stats(values: list[float]) -> dict[str, float | int | None]:
    """``n``, ``mean``, ``std`` (sample, n - 1: the seeds are a sample of all seeds) and the 95% interval of the
    mean, ``mean -/+ t(0.975, n - 1) * std / sqrt(n)``; std and interval are None below two values. Rounded to
    6 decimals, as the trial table."""
    n = len(values)
    out: dict[str, float | int | None] = {"n": n, "mean": None, "std": None, "ci95_low": None, "ci95_high": None}
    if n == 0:
        return out
    mean = statistics.fmean(values)
    out["mean"] = round(mean, 6)
    if n >= 2:
        std = statistics.stdev(values)
        half = t_quantile_975(n - 1) * std / math.sqrt(n)
        out.update(std=round(std, 6), ci95_low=round(mean - half, 6), ci95_high=round(mean + half, 6))
    return out


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest tail no other key shares (``sa_init.depth`` -> ``depth``; two
    ``loss_weight`` keys keep their task: ``ts_align.loss_weight``), for labels that fit on a plot axis."""
    out = {}
    for key in keys:
        parts = key.split(".")
        n = 1
        while n < len(parts) and sum(other.split(".")[-n:] == parts[-n:] for other in keys) > 1:
            n += 1
        out[key] = ".".join(parts[-n:])
    return out


def setting_labels(trials: list[dict[str, Any]]) -> dict[str, str]:
    """Trial id -> its setting's label, ``depth=3 loss_weight=1.0`` (the swept keys but run.seed, sorted);
    ``base config`` when the sweep varies the seed only. The label is the setting's identity. Without a seed
    dimension every trial is its own setting: trials with equal values (repeated samples, a repeated grid value)
    ran the same seed, so they are not seed replicates, and their labels get the trial id."""
    keys = sorted({k for t in trials for k in t["params"] if k != SEED_KEY})
    names = short_names(keys)
    labels = {t["trial_id"]: " ".join(f"{names[k]}={t['params'].get(k)}" for k in keys) or "base config"
              for t in trials}
    if not seeds_swept(trials):
        counts = Counter(labels.values())
        repeated = {v for v, c in counts.items() if c > 1}
        labels = {tid: f"{v} [{tid}]" if v in repeated else v for tid, v in labels.items()}
    return labels


def seeds_swept(trials: list[dict[str, Any]]) -> bool:
    return any(SEED_KEY in t["params"] for t in trials)


def setting_rows(trials: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """One row per setting, best first: its label and values, ``n`` (its trials with a ``metric``), the mean, the
    sample std and the 95% interval of the mean of those trials' best ``metric`` (:func:`seed_stats`), ``mark``
    (:func:`mark_settings`), the seeds, its best trial (the first of its trials in :func:`trial_rows`' order)
    and all its trial ids (that order).

    Best setting = best mean (``mode``). Equal means (6 decimals) are ordered by more trials with a metric
    first, then the smaller std (none last), then the rank of the setting's best trial among all trials
    (:func:`trial_rows`: its metric, its valid loss, values, trial id), so a sweep without seeds ranks its
    settings exactly as its trials. A setting without any metric comes last."""
    rows = trial_rows(trials, metric, mode)
    params = {t["trial_id"]: t["params"] for t in trials}
    labels = setting_labels(trials)
    keys = sorted({k for t in trials for k in t["params"] if k != SEED_KEY})
    col, mean, std = f"best_{metric}", f"mean_{metric}", f"std_{metric}"
    groups: dict[str, list[dict[str, Any]]] = {}  # label -> its trial rows; insertion order = rank of its best trial
    for r in rows:
        groups.setdefault(labels[r["trial_id"]], []).append(r)
    settings = []
    for label, members in groups.items():
        scored = [r for r in members if r[col] is not None]
        st = seed_stats([r[col] for r in scored])
        seeds = [params[r["trial_id"]].get(SEED_KEY) for r in scored if SEED_KEY in params[r["trial_id"]]]
        settings.append({"setting": label, **{k: params[members[0]["trial_id"]].get(k) for k in keys},
                         "n": st["n"], mean: st["mean"], std: st["std"], "ci95_low": st["ci95_low"],
                         "ci95_high": st["ci95_high"], "mark": "", "seeds": " ".join(str(x) for x in sorted(seeds)),
                         "best_trial": scored[0]["trial_id"] if scored else None,
                         "trial_ids": " ".join(str(r["trial_id"]) for r in members)})
    sign = -1 if mode == "max" else 1
    ranked = sorted(enumerate(settings), key=lambda ir: (
        ir[1][mean] is None, sign * (ir[1][mean] or 0.0), -ir[1]["n"],
        math.inf if ir[1][std] is None else ir[1][std], ir[0]))
    settings = [r for _, r in ranked]
    mark_settings(settings, metric)
    return settings


def mark_settings(settings: list[dict[str, Any]], metric: str) -> None:
    """Set ``mark`` on ``settings`` (best first): ``best`` on the best one, ``within seed spread`` on every
    other setting whose mean differs from the best's by less than the larger of their two seed standard
    deviations, ``|mean - best mean| < max(std, best std)`` (the difference rounded to 6 decimals, strictly
    less; a setting with one seed uses the std that exists). Such a setting is not shown worse than the best
    by this sweep. No seeds (no setting with two trials with a metric): every mark stays empty."""
    mean, std = f"mean_{metric}", f"std_{metric}"
    if not settings or settings[0][mean] is None or not any(r["n"] >= 2 for r in settings):
        return
    best = settings[0]
    best["mark"] = MARK_BEST
    for r in settings[1:]:
        spreads = [x for x in (r[std], best[std]) if x is not None]
        if r[mean] is not None and spreads and round(abs(r[mean] - best[mean]), 6) < max(spreads):
            r["mark"] = MARK_WITHIN


def best_setting(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    settings = setting_rows(trials, metric, mode)
    return settings[0] if settings and settings[0][f"mean_{metric}"] is not None else None


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best trial *of the best setting* (:func:`setting_rows`), by :func:`trial_rows`' order: the model a
    sweep exports comes from the setting that is best on average over seeds, not from a lucky seed of another
    one. Without seeds: the best trial."""
    best = best_setting(trials, metric, mode)
    if best is None:
        return None
    return next(t for t in trials if t["trial_id"] == best["best_trial"])


# --- tables ---------------------------------------------------------------------------------------------------------

SETTINGS_NOTE = ("Settings: the swept values but `run.seed`. n: its trials with a metric; mean, sample std and 95% "
                 "interval of the mean (Student t, n - 1 df) of their best metric; mark: `within seed spread` = "
                 "|mean - best mean| < the larger of the two stds.")


def write_tables(rows: list[dict[str, Any]], out_dir: Path, settings: list[dict[str, Any]] | None = None) -> None:
    """``results.csv`` (one row per trial, best first) and ``results.md``; with ``settings``, also
    ``settings.csv`` and the settings table first in ``results.md``, the trials after it."""
    cols = list(rows[0]) if rows else ["trial_id"]
    atomic_write_text(out_dir / "results.csv", _csv_text(rows, cols))
    md = markdown_table(rows, cols)
    if settings is not None:
        atomic_write_text(out_dir / "settings.csv", _csv_text(settings, _setting_cols(settings)))
        md = (f"## Settings (best first)\n\n{SETTINGS_NOTE}\n\n{settings_markdown(settings)}\n"
              f"## Trials (best first)\n\n{md}")
    atomic_write_text(out_dir / "results.md", md)


def _setting_cols(settings: list[dict[str, Any]]) -> list[str]:
    return list(settings[0]) if settings else ["setting", "n"]


def settings_markdown(settings: list[dict[str, Any]]) -> str:
    """The settings table (the console's last table, and the first of results.md)."""
    return markdown_table(settings, _setting_cols(settings))


def _csv_text(rows: list[dict[str, Any]], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def read_results_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- plots ----------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def setting_colours(labels: list[str]) -> dict[str, Any]:
    """One colour per setting label (in the given order, best first), shared by the plots: tab10 up to ten
    settings, tab20 up to twenty, then repeating."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_metric_vs_step(trials: list[dict[str, Any]], metric: str, path: Path, order: list[str] | None = None) -> None:
    """One line per trial: ``metric`` at every evaluation step, coloured by setting (the seeds of one setting
    share a colour and one legend entry). ``order``: the setting labels best first (colours, legend order)."""
    plt = _pyplot()
    labels = setting_labels(trials)
    order = order or list(dict.fromkeys(labels.values()))
    colours = setting_colours(order)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    named = set()
    for t in sorted(trials, key=lambda t: (order.index(labels[t["trial_id"]]), str(t["trial_id"]))):
        pts = [(h["steps"], h[metric]) for h in t["history"] if h.get(metric) is not None]
        if pts:
            label = labels[t["trial_id"]]
            ax.plot(*zip(*pts), marker="o", color=colours[label], alpha=0.8,
                    label=None if label in named else label[:60])
            named.add(label)
    ax.set_xlabel("SFT step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial (colour: setting)")
    if named:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_settings(settings: list[dict[str, Any]], rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """Per setting (x, best first): each trial's best ``metric`` as a dot (one per seed) and the mean with its
    95% interval as an error bar (none for a setting with one value)."""
    plt = _pyplot()
    value = {r["trial_id"]: r[f"best_{metric}"] for r in rows}
    colours = setting_colours([s["setting"] for s in settings])
    mean, lo, hi = f"mean_{metric}", "ci95_low", "ci95_high"
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 1.1 * len(settings)), 4.5))
    for x, s in enumerate(settings):
        pts = [value[t] for t in s["trial_ids"].split() if value.get(t) is not None]
        # spread the seeds a little sideways so equal values stay visible
        offs = [0.0] * len(pts) if len(pts) < 2 else [-0.15 + 0.3 * i / (len(pts) - 1) for i in range(len(pts))]
        ax.scatter([x + o for o in offs], pts, color=colours[s["setting"]], alpha=0.7, s=22, zorder=2)
        if s[mean] is not None:
            err = None if s[lo] is None else [[s[mean] - s[lo]], [s[hi] - s[mean]]]
            ax.errorbar([x], [s[mean]], yerr=err, fmt="D", color="black", capsize=5, markersize=5, zorder=3)
    ax.set_xticks(range(len(settings)), [s["setting"][:40] for s in settings], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per setting: seeds (dots), mean and 95% interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def best_grid(rows: list[dict[str, Any]], metric: str, mode: str, base: dict[str, Any],
              value: str | None = None) -> tuple[list, list, list]:
    """``(depths, weights, cells)``: the best ``value`` column (default ``best_<metric>``: trial rows) for each
    depth x TS-Align weight; with setting rows and ``mean_<metric>``, the best setting mean in the cell (a key
    the sweep does not vary takes the base config's value; a missing cell is None)."""
    col = value or f"best_{metric}"

    def val(r, key):
        return r[key] if r.get(key) is not None else get_dotted(base, key)

    depths = sorted({val(r, HEATMAP_ROWS) for r in rows})
    weights = sorted({val(r, HEATMAP_COLS) for r in rows})
    pick = max if mode == "max" else min
    cells = []
    for d in depths:
        line = []
        for w in weights:
            vals = [r[col] for r in rows if val(r, HEATMAP_ROWS) == d and val(r, HEATMAP_COLS) == w
                    and r[col] is not None]
            line.append(pick(vals) if vals else None)
        cells.append(line)
    return depths, weights, cells


def plot_heatmap(rows: list[dict[str, Any]], metric: str, mode: str, base: dict[str, Any], path: Path,
                 value: str | None = None) -> None:
    """``value`` (:func:`best_grid`) by SA-Init depth (rows) x TS-Align loss weight (columns), values written in
    the cells: the best trial's metric, or with setting rows the best setting's mean over seeds."""
    plt = _pyplot()
    import numpy as np

    depths, weights, cells = best_grid(rows, metric, mode, base, value)
    data = np.array([[np.nan if c is None else c for c in line] for line in cells], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(weights), 1.4 + 0.9 * len(depths)))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(weights)), [f"{w:g}" for w in weights])
    ax.set_yticks(range(len(depths)), [str(d) for d in depths])
    ax.set_xlabel("TS-Align loss weight")
    ax.set_ylabel("SA-Init depth")
    for i in range(len(depths)):
        for j in range(len(weights)):
            ax.text(j, i, "-" if np.isnan(data[i, j]) else f"{data[i, j]:.3f}", ha="center", va="center", color="w")
    seeded = bool(value) and value.startswith("mean_")
    fig.colorbar(im, ax=ax, label=f"mean {metric} over seeds" if seeded else f"best {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(trials: list[dict[str, Any]], metric: str, mode: str, base: dict[str, Any],
                  out_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every table and plot of a sweep into ``out_dir``: results.csv/.md, settings.csv, metric_vs_step.png,
    settings.png and best_by_depth_weight.png (per-setting means when seeds are swept: the best trial of a
    cell would be its luckiest seed). Returns ``(trial rows, setting rows)``, both best first."""
    rows = trial_rows(trials, metric, mode)
    settings = setting_rows(trials, metric, mode)
    write_tables(rows, out_dir, settings)
    plot_metric_vs_step(trials, metric, out_dir / "metric_vs_step.png", [s["setting"] for s in settings])
    plot_settings(settings, rows, metric, out_dir / "settings.png")
    if seeds_swept(trials):
        plot_heatmap(settings, metric, mode, base, out_dir / "best_by_depth_weight.png", f"mean_{metric}")
    else:
        plot_heatmap(rows, metric, mode, base, out_dir / "best_by_depth_weight.png")
    return rows, settings


def write_best_config(base: dict[str, Any], params: dict[str, Any], path: Path) -> Config:
    """The best trial's complete config, as the trial ran it (base + its values, its seed included, + the valid
    ranking probe and ``sft.best_metric``, so ``tsrec run`` keeps the model by the sweep's metric too), without
    the ``tune`` section; written as YAML and loaded back through the schema so ``tsrec run`` accepts it."""
    cfg = trial_config(base, params)
    raw = cfg.to_dict()
    raw.pop("tune")
    text = "# Best trial of a `tsrec tune` sweep: run it with `tsrec run --config THIS_FILE`.\n"
    if raw["run"]["seed"] != base["run"]["seed"]:
        text += (f"# run.seed {raw['run']['seed']} trains on the sweep's data, SIDs and semantics, built with "
                 f"run.data_seed {raw['run']['data_seed']}: `tsrec run` reuses them.\n")
    text += yaml.safe_dump(raw, sort_keys=False)
    if not (path.exists() and path.read_text(encoding="utf-8") == text):  # a rerun leaves an unchanged file alone
        atomic_write_text(path, text)
    return load_config(path)  # ConfigError here would be a bug: the file must load
