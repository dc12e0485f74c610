"""`tsrec report RUN_DIR`: report.md and report.html with every section, from a small run folder written
with the stages' own writers; a partial run (no semantics, no model) shows those stages as "not run"."""

from __future__ import annotations

import base64
import json
import re
import shutil

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
