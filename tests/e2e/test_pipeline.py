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
            # The quality contract scaled to those caps (a record is ok only within it): at the default
            # 55 words / 15 keywords no record could pass and SA-Init would have nothing to initialise.
            "teacher.min_description_words=10",
            "teacher.min_keywords=3",
            "sft.max_steps=12",
            "sft.eval_every_steps=6",
            "sft.save_every_steps=6",
            # The demo's rl stage (beam groups), shrunk: 4 steps of 8 prompts x G 4.
            "rl.max_steps=4",
            "rl.group_size=4",
            "rl.prompts_per_step=8",
            "rl.eval_every_steps=2",
            "rl.save_every_steps=2",
            "rl.log_every_steps=1",
            "rl.valid_sample_size=32",
            "eval.beams=5",
            "eval.ks=[1,3,5]",
        ],
    )
    logs = []
    summary = run_pipeline(cfg, log=logs.append)
    root = Path(cfg.run.out_dir)
    for sub, name in [("data", "items.parquet"), ("sids", "index.json"), ("semantics", "semantics.parquet"),
                      ("model", "config.json"), ("sft", "model/config.json"), ("rl", "model/config.json"),
                      ("rl", "summary.json"), ("eval", "metrics.json")]:  # fmt: skip
        assert (root / sub / name).exists(), f"{sub}/{name}"
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["invalid_sids"] == 0
    assert "rl" in cfg.pipeline.stages and set(summary["stages"]) == set(cfg.pipeline.stages)
    rl = json.loads((root / "rl" / "summary.json").read_text())
    assert rl["steps"] == 4 and rl["start_valid_ndcg@10"] is not None
    evaluated = json.loads((root / "eval" / "manifest.json").read_text())["inputs"]["model"]["path"]
    assert Path(evaluated).resolve() == (root / "rl" / "model").resolve()  # eval scored the RL model
    _check_semantics_and_sa_init(cfg, root)

    # Second run: everything is up to date and skipped; changing eval.beams reruns only eval.
    logs.clear()
    run_pipeline(cfg, log=logs.append)
    assert sum("skipped" in line for line in logs) == len(cfg.pipeline.stages)
    logs.clear()
    cfg.eval.beams = 3
    cfg.eval.ks = [1, 3]
    run_pipeline(cfg, log=logs.append)
    assert [line for line in logs if "running" in line] == [f"[tsrec run] eval: running -> {root / 'eval'}"]


def _check_semantics_and_sa_init(cfg, root: Path) -> None:
    """The teacher's records are valid and exactly the ok ones; SA-Init initialised exactly their rows."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from tsrec.semantics.answers import Contract
    from tsrec.semantics.records import read_teacher_file
    from tsrec.sid.index import read_index, token_level

    tokens = read_index(root / "sids").all_tokens()
    assert {t[1] for t in tokens} == {"a", "b", "c", "d"}  # sid.collision=extra_level
    sem = pq.read_table(root / "semantics" / "semantics.parquet").to_pylist()
    assert len(sem) == cfg.teacher.limit == len({r["token"] for r in sem}) and {r["token"] for r in sem} <= set(tokens)
    assert {r["status"] for r in sem} <= {"ok", "failed"} and {r["engine"] for r in sem} == {"hf"}
    ok = {r["token"]: r for r in sem if r["status"] == "ok"}
    assert ok, [r["error"] for r in sem]  # the real SmolLM2 teacher produced at least one usable record
    # description_keywords.json holds exactly the ok records, each within the enforced METHOD.md 1.4 contract.
    records = read_teacher_file(root / "semantics" / "description_keywords.json")
    assert {r["token"] for r in records} == set(ok)
    contract = Contract.from_config(cfg.teacher)
    for rec in records:
        assert rec["description"] == ok[rec["token"]]["description"]
        assert contract.violations(rec["description"], rec["keywords"], rec["keywords"]) == [], rec
        assert rec["keywords"] == json.loads(ok[rec["token"]]["keywords"])
    failures = json.loads((root / "semantics" / "failures.json").read_text())
    assert {f["token"] for f in failures["failed"]} == {r["token"] for r in sem if r["status"] == "failed"}
    assert len(failures["not_requested"]) == len(tokens) - cfg.teacher.limit

    # init_report.json: one row per SID token with its tokenizer id; "sa_init" exactly for the records'
    # tokens in the first sa_init.depth levels, and the counts add up.
    report = json.loads((root / "model" / "init_report.json").read_text())
    tok = AutoTokenizer.from_pretrained(root / "model")
    assert [r["token"] for r in report["rows"]] == tokens
    assert [r["id"] for r in report["rows"]] == tok.convert_tokens_to_ids(tokens)
    want = {t for t in ok if token_level(t) < cfg.sa_init.depth}
    assert {r["token"] for r in report["rows"] if r["init"] == "sa_init"} == want
    assert report["sa_init_rows"] == len(want) == report["init_kinds"].get("sa_init", 0)
    assert sum(report["init_kinds"].values()) == report["sid_tokens"] == len(tokens)
    assert report["depth"] == cfg.sa_init.depth
