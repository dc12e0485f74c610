"""Sweep outputs from plain trial records: results.csv / results.md, the two PNGs, best_config.yaml.

A trial record (built by the orchestration from Ray Tune's ResultGrid, or by a test by hand)::

    {"trial_id": "a1b2", "params": {"sa_init.depth": 3, ...}, "history": [{"steps": 2, "valid_ndcg@10": 0.1, ...}],
     "finished": True, "error": None, "wall_s": 41.2, "max_steps": 8}
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from tsrec.artifacts import atomic_write_text
from tsrec.config import Config, load_config
from tsrec.tune.space import trial_config

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


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    rows = trial_rows(trials, metric, mode)
    if not rows or rows[0][f"best_{metric}"] is None:
        return None
    return next(t for t in trials if t["trial_id"] == rows[0]["trial_id"])


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """``results.csv`` and ``results.md`` (same columns, best trial first)."""
    cols = list(rows[0]) if rows else ["trial_id"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out_dir / "results.csv", buf.getvalue())
    atomic_write_text(out_dir / "results.md", markdown_table(rows, cols))


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


def plot_metric_vs_step(trials: list[dict[str, Any]], metric: str, path: Path) -> None:
    """One line per trial: ``metric`` at every evaluation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in trials:
        pts = [(h["steps"], h[metric]) for h in t["history"] if h.get(metric) is not None]
        if pts:
            label = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t["params"].items())
            ax.plot(*zip(*pts), marker="o", label=f"{t['trial_id']} {label}"[:60])
    ax.set_xlabel("SFT step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def best_grid(rows: list[dict[str, Any]], metric: str, mode: str, base: dict[str, Any]) -> tuple[list, list, list]:
    """``(depths, weights, cells)``: the best metric over trials for each depth x TS-Align weight
    (a key the sweep does not vary takes the base config's value; a missing cell is None)."""
    from tsrec.tune.space import get_dotted

    def val(r, key):
        return r[key] if r.get(key) is not None else get_dotted(base, key)

    depths = sorted({val(r, HEATMAP_ROWS) for r in rows})
    weights = sorted({val(r, HEATMAP_COLS) for r in rows})
    pick = max if mode == "max" else min
    cells = []
    for d in depths:
        line = []
        for w in weights:
            vals = [r[f"best_{metric}"] for r in rows if val(r, HEATMAP_ROWS) == d and val(r, HEATMAP_COLS) == w
                    and r[f"best_{metric}"] is not None]
            line.append(pick(vals) if vals else None)
        cells.append(line)
    return depths, weights, cells


def plot_heatmap(rows: list[dict[str, Any]], metric: str, mode: str, base: dict[str, Any], path: Path) -> None:
    """Best ``metric`` by SA-Init depth (rows) x TS-Align loss weight (columns), values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    depths, weights, cells = best_grid(rows, metric, mode, base)
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
    fig.colorbar(im, ax=ax, label=f"best {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_best_config(base: dict[str, Any], params: dict[str, Any], path: Path) -> Config:
    """The best trial's complete config, as the trial ran it (base + its values + the valid ranking probe
    and ``sft.best_metric``, so ``tsrec run`` keeps the model by the sweep's metric too), without the
    ``tune`` section; written as YAML and loaded back through the schema so ``tsrec run`` accepts it."""
    cfg = trial_config(base, params)
    raw = cfg.to_dict()
    raw.pop("tune")
    text = "# Best trial of a `tsrec tune` sweep: run it with `tsrec run --config THIS_FILE`.\n"
    text += yaml.safe_dump(raw, sort_keys=False)
    if not (path.exists() and path.read_text(encoding="utf-8") == text):  # a rerun leaves an unchanged file alone
        atomic_write_text(path, text)
    return load_config(path)  # ConfigError here would be a bug: the file must load
