"""Training logs from metric rows: ``metrics.csv``, TensorBoard events (``tensorboard/``), ``loss.png``.

Written once from the full row list at the end of a run (rows travel inside checkpoints), so a run that
was killed and resumed still gets one continuous curve.
"""

from __future__ import annotations

from pathlib import Path

from tsrec.train.metrics import write_run_logs


def write_logs(rows: list[dict], out_dir: Path) -> None:
    """Write ``metrics.csv``, ``tensorboard/`` and ``loss.png`` into ``out_dir``."""
    write_run_logs(rows, out_dir, plot_losses, "loss.png")


def plot_losses(rows: list[dict], path: Path) -> None:
    """Train loss (total and per task) and validation loss against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for r in rows for k in r if k.startswith("train/loss") or k == "eval/loss"})
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=k, marker="o" if k == "eval/loss" else None,
                    linewidth=2 if k in ("train/loss", "eval/loss") else 1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
