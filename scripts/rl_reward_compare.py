"""RL rewards compared from one SFT model over seeds (issue 22; results in docs/results.md "RL on Industrial").

    python scripts/rl_reward_compare.py --config configs/industrial_cpu.yaml

From a finished run of the config (its <run.out_dir>/sft/model, data, sids and teacher file), every reward in
--rewards is trained with the config's `rl:` block once per seed (`tsrec rl`, each into its own folder under
<run.out_dir>/rl_compare/), and its exported model (best on the RL valid probe, or the SFT start when no
evaluation beat it) is scored on every test row (`tsrec eval`, the config's beam width). The probe's valid rows
are the same for every seed (run.data_seed pinned to the config's seed), so the seeds differ only in RL itself.
Finished pairs are skipped, so a killed comparison resumes where it stopped. Writes results.csv and results.md
(mean, sample std and 95% t-interval over seeds per reward, and each reward's paired difference to `ranking`).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tsrec.config import load_config
from tsrec.tune.results import seed_stats

# name -> overrides; "ranking" first: the paired differences are taken against it.
REWARDS = {
    "ranking": ["rl.reward=ranking"],
    "ranking+jaccard": ["rl.reward=ranking+semantic", "rl.semantic_similarity=jaccard"],
    "ranking+embedding": ["rl.reward=ranking+semantic", "rl.semantic_similarity=embedding"],
}


def spread(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the 95% t-interval (tsrec.tune.results.seed_stats, the sweeps' own
    statistics; std and half-width nan for one value)."""
    st = seed_stats(values)
    if st["std"] is None:
        return st["mean"], math.nan, math.nan
    return st["mean"], st["std"], st["mean"] - st["ci95_low"]


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}); see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--run-dir", default="", help="the finished run to start from (default: the config's run.out_dir)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--rewards", nargs="+", default=list(REWARDS), choices=list(REWARDS))
    args = ap.parse_args()

    cfg = load_config(args.config)
    run_dir = Path(args.run_dir or cfg.run.out_dir)
    sft_model = run_dir / "sft" / "model"
    if not (sft_model / "config.json").exists():
        sys.exit(f"{sft_model}: no SFT model; run `tsrec run --config {args.config}` first")
    out_root = run_dir / "rl_compare"
    out_root.mkdir(parents=True, exist_ok=True)
    tsrec = [sys.executable, "-m", "tsrec"]
    common = ["--config", args.config, "--data", str(run_dir / "data"), "--sids", str(run_dir / "sids")]
    env_seed = f"run.data_seed={cfg.run.upstream_seed}"

    rows = []
    for reward in args.rewards:
        for seed in args.seeds:
            out = out_root / f"{reward}-seed{seed}"
            summary, test = out / "rl" / "summary.json", out / "eval_test" / "metrics.json"
            if not summary.exists():
                run(tsrec + ["rl", *common, "--model", str(sft_model), "--out", str(out / "rl"),
                             "--semantics", str(run_dir / "semantics" / "description_keywords.json"),
                             "--seed", str(seed), env_seed, *REWARDS[reward]], out / "rl.log")
            if not test.exists():
                run(tsrec + ["eval", *common, "--model", str(out / "rl" / "model"), "--split", "test",
                             "--beams", str(cfg.eval.beams), "--out", str(out / "eval_test"), env_seed,
                             "eval.sasrec=false", "eval.published="], out / "eval.log")
            s, t = json.loads(summary.read_text()), json.loads(test.read_text())
            rows.append({"reward": reward, "seed": seed, "steps": s["steps"],
                         "valid_start": s["start_valid_ndcg@10"], "valid_best": s["best_valid_ndcg@10"],
                         "valid_final": list(s["valid_ndcg@10_by_steps"].values())[-1],
                         "best_after_steps": s["best_after_steps"], "final_kl": s["final_kl"],
                         "test_ndcg@10": t["ndcg@10"], "test_hr@10": t["hr@10"], "test_rows": t["rows"],
                         "invalid_sids": t["invalid_sids"]})
            print(f"{reward} seed {seed}: valid NDCG@10 {s['start_valid_ndcg@10']:.4f} -> {s['best_valid_ndcg@10']:.4f} "
                  f"(step {s['best_after_steps']}), test NDCG@10 {t['ndcg@10']:.4f} HR@10 {t['hr@10']:.4f}", flush=True)

    with (out_root / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    sft_test = json.loads((run_dir / "eval" / "metrics.json").read_text()) if (run_dir / "eval" / "metrics.json").exists() else None
    n_test = rows[0]["test_rows"]
    lines = [f"RL rewards from `{sft_model}` ({cfg.rl.max_steps} steps, lr {cfg.rl.lr}, group {cfg.rl.group_size}, "
             f"{cfg.rl.prompts_per_step} prompts/step, beta {cfg.rl.beta}); seeds {args.seeds}. Valid: the RL probe "
             f"({cfg.rl.valid_sample_size or 'all'} rows, beam {cfg.rl.eval_beams}; it also selects the exported "
             f"step, so its 'best' is biased upward). Test: all {n_test} rows, beam {cfg.eval.beams}; one row moves "
             f"test NDCG@10 by at most {1 / n_test:.5f}.", ""]
    if sft_test:
        lines.append(f"SFT start on test: NDCG@10 {sft_test['ndcg@10']:.4f}, HR@10 {sft_test['hr@10']:.4f}.")
        lines.append("")
    lines += ["| reward | n | valid start | valid after the last step minus start, mean [95% CI] "
              "| valid best, mean ± std | test NDCG@10 (exported), mean ± std [95% CI] | test HR@10 mean "
              "| test NDCG@10 minus `ranking`, paired [95% CI] | final KL mean |",
              "|---|---|---|---|---|---|---|---|---|"]
    by = {r: [row for row in rows if row["reward"] == r] for r in args.rewards}
    base = {row["seed"]: row for row in by.get("ranking", [])}
    for reward, rs in by.items():
        vb = spread([r["valid_best"] for r in rs])
        vf = spread([r["valid_final"] - r["valid_start"] for r in rs])
        tn = spread([r["test_ndcg@10"] for r in rs])
        diffs = [r["test_ndcg@10"] - base[r["seed"]]["test_ndcg@10"] for r in rs if r["seed"] in base]
        dtxt = "-"
        if reward != "ranking" and diffs:
            d = spread(diffs)
            dtxt = f"{d[0]:+.4f} [{d[0] - d[2]:+.4f}, {d[0] + d[2]:+.4f}]"
        lines.append(f"| {reward} | {len(rs)} | {rs[0]['valid_start']:.4f} | {vf[0]:+.4f} [{vf[0] - vf[2]:+.4f}, "
                     f"{vf[0] + vf[2]:+.4f}] | {vb[0]:.4f} ± {vb[1]:.4f} | {tn[0]:.4f} ± {tn[1]:.4f} "
                     f"[{tn[0] - tn[2]:.4f}, {tn[0] + tn[2]:.4f}] | {spread([r['test_hr@10'] for r in rs])[0]:.4f} "
                     f"| {dtxt} | {spread([r['final_kl'] for r in rs])[0]:.4f} |")
    (out_root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n{out_root / 'results.md'}, {out_root / 'results.csv'}")


if __name__ == "__main__":
    os.environ.setdefault("TSREC_QUIET", "1")
    main()
