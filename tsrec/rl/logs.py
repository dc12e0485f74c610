"""RL's plot (``rl.png``, beside ``metrics.csv`` and TensorBoard: ``tsrec.train.metrics.save_logs``) and the
start-vs-best valid NDCG@10 line (:func:`valid_progress`, :func:`progress_line`) that the loop, ``tsrec rl`` and the report print."""

from __future__ import annotations

from pathlib import Path
from typing import Any

def plot_rl(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("rollout/reward_mean", "train/kl", "eval/ndcg@10"),
                              ("reward (mean)", "KL to reference (k3)", "valid NDCG@10")):
        # x = RL steps done, so the start (row step -1) sits at 0 on the valid NDCG@10 curve
        pts = [(r["step"] + 1, r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None)
        ax.set_title(title)
        ax.set_xlabel("RL steps done")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def valid_progress(rows: list[dict]) -> dict[str, Any]:
    """Start vs best valid NDCG@10 from the metrics rows (the start is the ``step`` -1 row).

    Steps are counted as RL steps done (an evaluation after row ``step`` s has s + 1 steps behind it):
    ``best_after_steps`` where the best valid NDCG@10 was first reached (0 = the start was never beaten),
    ``first_gain_after_steps`` the first evaluation above the start (None = never), i.e. how fast a run learns.
    """
    evals = [r for r in rows if "eval/ndcg@10" in r]
    start = next((r["eval/ndcg@10"] for r in evals if r["step"] < 0), None)
    out: dict[str, Any] = {"start_valid_ndcg@10": start, "best_valid_ndcg@10": None, "best_after_steps": None,
                           "valid_ndcg@10_gain": None, "first_gain_after_steps": None,
                           "valid_ndcg@10_by_steps": {int(r["step"]) + 1: r["eval/ndcg@10"] for r in evals}}
    if not evals:
        return out
    best = max(evals, key=lambda r: (r["eval/ndcg@10"], -r["step"]))  # the earliest of equal bests
    out.update({"best_valid_ndcg@10": best["eval/ndcg@10"], "best_after_steps": int(best["step"]) + 1})
    if start is not None:
        out["valid_ndcg@10_gain"] = best["eval/ndcg@10"] - start
        out["first_gain_after_steps"] = next((int(r["step"]) + 1 for r in evals if r["step"] >= 0
                                              and r["eval/ndcg@10"] > start), None)
    return out


def progress_line(p: dict[str, Any]) -> str:
    """One line: ``valid NDCG@10 start 0.2100 -> best 0.2400 after 30 steps (+0.0300; first gain after 10 steps)``."""
    if p.get("start_valid_ndcg@10") is None:
        return "valid NDCG@10: no start evaluation"
    gain = p["valid_ndcg@10_gain"]
    first = p["first_gain_after_steps"]
    return (f"valid NDCG@10 start {p['start_valid_ndcg@10']:.4f} -> best {p['best_valid_ndcg@10']:.4f} after "
            f"{p['best_after_steps']} steps ({gain:+.4f}; "
            + (f"first gain after {first} steps)" if first is not None else "never above the start)"))
