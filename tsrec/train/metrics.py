"""Metric rows of a training run: ``metrics.csv`` (one row per logged step) and TensorBoard events.

Written from the full row list (rows travel inside checkpoints), so a run that was killed and resumed
still gets one continuous curve.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_run_logs(rows: list[dict], out_dir: Path, plot: Callable[[list[dict], Path], None], plot_name: str) -> None:
    """``metrics.csv``, ``tensorboard/`` and the recipe's plot (``plot(rows, out_dir / plot_name)``).

    A training image without tensorboard or matplotlib (the lent GPU machine) still gets ``metrics.csv``:
    a finished run must not fail on its pictures."""
    import importlib.util

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(out_dir / "metrics.csv", rows)
    if importlib.util.find_spec("tensorboard") is not None:
        write_tensorboard(rows, out_dir / "tensorboard")
    if importlib.util.find_spec("matplotlib") is not None:
        plot(rows, out_dir / plot_name)


def save_logs(ctx, rows: list[dict], plot: Callable[[list[dict], Path], None], plot_name: str, rank: int) -> None:
    """The run's logs (:func:`write_run_logs`) handed to ``ctx.save_artifact("logs")`` by rank 0."""
    if rank != 0:
        return
    with tempfile.TemporaryDirectory(prefix="tsrec-logs-") as d:
        write_run_logs(rows, Path(d), plot, plot_name)
        ctx.save_artifact(Path(d), "logs")


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """One row per step; columns = the union of keys (first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_metrics_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def write_tensorboard(rows: list[dict], log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir))
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, global_step=int(r["step"]))
    writer.close()


def _num(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
