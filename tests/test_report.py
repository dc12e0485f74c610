"""`tsrec report RUN_DIR`: report.md and report.html with every section, from a small run folder written
with the stages' own writers; a partial run (no semantics, no model) shows those stages as "not run"."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from tsrec.artifacts import atomic_write_json, write_manifest, write_parquet
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.data.prepare import prepare_data
from tsrec.decode.evaluate import write_results
from tsrec.sft.logs import write_logs
from tsrec.sid.index import SidIndex

SECTIONS = ["## Stages", "## Teacher semantics", "## SA-Init", "## SFT loss", "## RL", "## Metrics",
            "## Example recommendations"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(overrides=["data.source=synthetic", "data.synthetic.n_items=40", "data.synthetic.n_users=30",
                                 "eval.beams=5", "eval.ks=[1,5]"])
    prepare_data(cfg, root / "data")
    import pyarrow.parquet as pq

    items = pq.read_table(root / "data" / "items.parquet").column("item_id").to_pylist()
    index = SidIndex.from_codes(items, [(i % 4, (i // 4) % 4, i // 16) for i in items])
    atomic_write_json(root / "sids" / "index.json", index.to_json_obj())
    write_manifest(root / "sids", "sid", cfg, stats={"items": len(items), "levels": 3, "codebook_size": 4})

    sem = root / "semantics"
    write_parquet(pa.table({"token": ["<a_0>", "<a_1>", "<a_2>"], "status": ["ok", "ok", "failed"],
                            "description": ["Hand tools for the workshop.", "Lab glassware.", None],
                            "keywords": [json.dumps(["wrench", "pliers"]), json.dumps(["beaker", "flask"]), None],
                            "error": [None, None, "answer is not JSON"]}), sem / "semantics.parquet")
    write_manifest(sem, "semantics", cfg, stats={"engine": "hf", "model": "SmolLM2", "ok": 2, "failed": 1,
                                                 "tokens_requested": 3})
    mdl = root / "model"
    rep = {"depth": 3, "source": "keywords", "sa_init_rows": 2, "sid_tokens": 12, "tied": True,
           "init_kinds": {"sa_init": 2, "resized": 10}, "rows": []}
    atomic_write_json(mdl / "init_report.json", rep)
    write_manifest(mdl, "model", cfg, stats=rep)
    sft = root / "sft"
    rows = [{"step": s, "train/loss": 5.0 / s, "train/loss/next_sid": 6.0 / s, "train/loss/title2sid": 4.0 / s,
             **({"eval/loss": 5.5 / s} if s % 2 == 0 else {})} for s in range(1, 9)]
    write_logs(rows, sft)
    write_manifest(sft, "sft", cfg, stats={"steps": 8, "final_train_loss": 0.625, "final_val_loss": 0.6875})

    rl = root / "rl"
    from tsrec.rl.logs import plot_rl, valid_progress

    rl_rows = [{"step": -1, "eval/ndcg@10": 0.25}, *({"step": s, "rollout/reward_mean": 0.1 * s, "train/kl": 0.001 * s,
                                                    **({"eval/ndcg@10": 0.25 + 0.01 * s} if s % 2 else {})}
                                                   for s in range(4))]
    rl.mkdir()
    plot_rl(rl_rows, rl / "rl.png")
    write_manifest(rl, "rl", load_config(overrides=["rl.reward=ranking+semantic"]),
                   stats={"steps": 4, **valid_progress(rl_rows), "model": "best"})

    test = pq.read_table(root / "data" / "test.parquet").to_pylist()[:6]
    sids = index.sids()
    results = []
    for i, r in enumerate(test):
        ranked = [sids[(r["item_id"] + d) % len(items)] for d in ((0, 1, 2, 3, 4) if i % 2 == 0 else (1, 2, 3, 4, 5))]
        hit = ranked.index(sids[r["item_id"]]) if sids[r["item_id"]] in ranked else -1
        results.append({"row": i, "user_id": r["user_id"], "item_id": r["item_id"], "prompt": "p",
                        "target_sid": sids[r["item_id"]], "ranked_sids": ranked, "scores": [-1.0] * 5,
                        "hit_rank": hit, "empty_events": 0})
    write_results(cfg, results, root / "eval", {"model": mdl, "data": root / "data", "sids": root / "sids"})
    return root


def test_report_has_every_section(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    for s in SECTIONS:
        assert s in md, s
        assert f"<h2>{s[3:]}</h2>" in page, s
    assert "not run" not in md
    assert "**2 valid**, **1 failed**" in md and "Hand tools for the workshop." in md and "beaker, flask" in md
    assert "Depth **3**" in md and "**2** of 12" in md
    for task in ("total", "next_sid", "title2sid"):
        assert f"report_files/loss_{task}.png" in md
    assert ("Reward `ranking+semantic`, 4 steps: valid NDCG@10 **0.2500** at the SFT start, best **0.2800** after 4 "
            "steps (+0.0300)") in md
    assert "| valid NDCG@10 | 0.2500 | 0.2600 | 0.2800 |" in md and "![rl](rl/rl.png)" in md
    assert "| rl | done |" in md and "best 0.2800 after 4 steps" in md
    pngs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(pngs) == 4 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "tsrec (model)" in md and "popularity (baseline)" in md and "markov (baseline)" in md
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert f"| tsrec (model) | {metrics['hr@1']:.4f} |" in md
    assert md.count("**Row ") == 4 and "✅" in md and "- target: **" in md and "- history: " in md
    assert "report.md" in capsys.readouterr().out  # the console summary names the report


def test_missing_stages_show_as_not_run(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    for name in ("semantics", "model", "eval"):
        shutil.rmtree(partial / name)
    from tsrec.report import write_report

    paths = write_report(partial)
    md = paths["markdown"].read_text()
    for s in SECTIONS:
        assert s in md, s
    assert md.count("not run") == 3 + 4  # stage table (3) + teacher, SA-Init, metrics, examples
    assert "<p class='notrun'>not run</p>" in paths["html"].read_text()


def _sweep_run(root, tune_dir_name="tune"):
    """A finished seeded sweep's folder, written by the sweep driver's own output step on hand-built trials:
    depth 3 over seeds 42/1/2 scores 0.30/0.34/0.32 (mean 0.32, std 0.02), depth 0 0.36/0.24/0.30 (mean 0.30,
    std 0.06: within seed spread, and its seed 42 is the best single trial)."""
    from tsrec.orchestration.tune import _write_outputs

    sweep = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "demo.yaml"
    cfg = load_config(sweep, [f"run.out_dir={root}", f"tune.dir={tune_dir_name}", "tune.metric=valid_ndcg@10",
                              "tune.mode=max", "tune.export_best=false", "tune.eval_test=false",
                              "tune.space={sa_init.depth: {grid: [0, 3]}, run.seed: {grid: [42, 1, 2]}}"])
    trials = [{"trial_id": f"d{d}s{s}", "params": {"sa_init.depth": d, "run.seed": s}, "finished": True, "error": None,
               "wall_s": 1.0, "max_steps": 4, "history": [{"steps": 4, "valid_ndcg@10": v, "valid_loss": 1.0}]}
              for d, vals in ((3, (0.30, 0.34, 0.32)), (0, (0.36, 0.24, 0.30))) for s, v in zip((42, 1, 2), vals)]
    tune_dir = root / tune_dir_name
    tune_dir.mkdir(parents=True)
    atomic_write_json(tune_dir / "sweep.json", {"identity": "abc"})
    log = []
    return _write_outputs(cfg, cfg.to_dict(), trials, tune_dir, root, log.append, "abc"), log


def test_sweep_summary_and_console(tmp_path):
    """summary.json: the settings and the best setting; the best trial is the best of the best setting (not the
    depth-0 seed that scored highest alone); the console's last table is the settings table."""
    summary, log = _sweep_run(tmp_path)
    assert [s["setting"] for s in summary["settings"]] == ["depth=3", "depth=0"]
    best = summary["best_setting"]
    assert (best["n"], best["mean_valid_ndcg@10"], best["std_valid_ndcg@10"], best["mark"]) == (3, 0.32, 0.02, "best")
    assert summary["settings"][1]["mark"] == "within seed spread"
    assert (summary["best_trial"], summary["best_metric"]) == ("d3s1", 0.34)
    assert summary["best_params"] == {"sa_init.depth": 3, "run.seed": 1}
    assert load_config(tmp_path / "tune" / "best_config.yaml").run.seed == 1
    assert log[-2].startswith("| setting |") and "| depth=3 |" in log[-2] and "| trial_id |" not in log[-2]
    for f in ("settings.csv", "settings.png", "metric_vs_step.png", "results.md"):
        assert (tmp_path / "tune" / f).exists(), f


@pytest.mark.parametrize("tune_dir_name", ["tune", "tune_seeds"])
def test_report_has_a_sweep_section(tmp_path, tune_dir_name, capsys):
    """`tsrec report RUN_DIR` on a sweep's run folder (run.out_dir): a Sweep section with the settings table
    (mean ± 95% interval, n, mark), the best setting and both plots; the sweep is found in any tune.dir."""
    _sweep_run(tmp_path, tune_dir_name)
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    title = "Sweep" if tune_dir_name == "tune" else f"Sweep {tune_dir_name}"
    assert f"## {title}\n" in md and f"<h2>{title}</h2>" in page
    assert md.index(f"## {title}") < md.index("## Teacher semantics")
    assert "| setting | n | mean valid_ndcg@10 ± 95% interval | std | mark | seeds |" in md
    # 0.32 ± 4.3027 * 0.02 / sqrt(3) = 0.049683; 0.30 ± 4.3027 * 0.06 / sqrt(3) = 0.149050 (interval bounds are
    # kept to 6 decimals: 0.15095 .. 0.44905, half 0.14905 -> 0.1491)
    assert "| depth=3 | 3 | 0.3200 ± 0.0497 | 0.0200 | best | 1 2 42 |" in md
    assert "| depth=0 | 3 | 0.3000 ± 0.1491 | 0.0600 | within seed spread | 1 2 42 |" in md
    assert "Best setting: **depth=3**, 0.3200 ± 0.0497 over 3 trial(s); its best trial `d3s1` (seed 1)" in md
    for png in ("settings", "metric_vs_step"):
        assert f"![{png}]({tune_dir_name}/{png}.png)" in md
    assert "<td>0.3200 ± 0.0497</td>" in page and "<b>depth=3</b>" in page
    pngs = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(pngs) == 2 and all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert f"{tune_dir_name}: best setting depth=3, valid_ndcg@10 0.3200 ± 0.0497 (mean ± 95% interval) over 3 seed(s)" in capsys.readouterr().out
