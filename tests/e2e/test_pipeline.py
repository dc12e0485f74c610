"""`tsrec run`: every stage on a small synthetic catalogue, on the session's local Ray cluster.

This is the demo config shrunk to test size; it checks the stages connect through their artifacts,
that the evaluation decodes only catalogue SIDs, and that a rerun skips completed stages.
"""

import json
from pathlib import Path

import pytest

from tsrec.config import load_config
from tsrec.orchestration.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
def test_pipeline_end_to_end(ray_cluster, tmp_path):
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"run.out_dir={tmp_path / 'run'}",
            "data.synthetic.n_items=80",
            "data.synthetic.n_users=160",
            "data.synthetic.n_categories=4",
            "sid.codebook_size=4",
            "sid.collision=extra_level",  # 4-token SIDs <a><b><c><d> through every stage
            "teacher.max_items_per_prompt=6",
            "teacher.limit=4",  # 4 tokens through the real SmolLM2 teacher; the rest keep the default init
            "teacher.guided_description_tokens=48",
            "teacher.guided_max_keywords=6",
            "sft.max_steps=12",
            "sft.eval_every_steps=6",
            "sft.save_every_steps=6",
            "eval.beams=5",
            "eval.ks=[1,3,5]",
        ],
    )
    logs = []
    summary = run_pipeline(cfg, log=logs.append)
    root = Path(cfg.run.out_dir)
    for sub, name in [("data", "items.parquet"), ("sids", "index.json"), ("semantics", "semantics.parquet"),
                      ("model", "config.json"), ("sft", "model/config.json"), ("eval", "metrics.json")]:  # fmt: skip
        assert (root / sub / name).exists(), f"{sub}/{name}"
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["invalid_sids"] == 0
    assert set(summary["stages"]) == set(cfg.pipeline.stages)

    # Second run: everything is up to date and skipped; changing eval.beams reruns only eval.
    logs.clear()
    run_pipeline(cfg, log=logs.append)
    assert sum("skipped" in line for line in logs) == len(cfg.pipeline.stages)
    logs.clear()
    cfg.eval.beams = 3
    cfg.eval.ks = [1, 3]
    run_pipeline(cfg, log=logs.append)
    assert [line for line in logs if "running" in line] == [f"[tsrec run] eval: running -> {root / 'eval'}"]
