"""`tsrec semantics extract` with the file engine: validation against the index, limit + resume, CLI."""

import json

import pandas as pd
import pytest

from tsrec.artifacts import InputError
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.orchestration.semantics import extract_semantics


@pytest.fixture
def catalogue(tmp_path):
    sids = tmp_path / "sids"
    sids.mkdir()
    index = {"0": ["<a_1>", "<b_0>"], "1": ["<a_0>", "<b_0>"], "2": ["<a_1>", "<b_2>"]}
    (sids / "index.json").write_text(json.dumps(index))
    recs = [{"description": f"Family {t}.", "keywords": ["k1", "k2"], "token": t} for t in ("<b_0>", "<a_0>", "<a_1>", "<c_7>")]
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps(recs))
    return sids, teacher


def test_missing_and_extra_tokens_are_reported(catalogue, tmp_path):
    sids, teacher = catalogue
    cfg = load_config(overrides=["teacher.engine=file", f"teacher.file={teacher}"])
    stats = extract_semantics(cfg, sids, tmp_path / "no_data", tmp_path / "out")
    assert stats["ok"] == 3 and stats["failed"] == 1 and stats["file_extra_tokens"] == ["<c_7>"]
    out = json.loads((tmp_path / "out" / "description_keywords.json").read_text())
    assert [r["token"] for r in out] == ["<a_1>", "<a_0>", "<b_0>"]  # index token order, not file order
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["token"] for f in failures["failed"]] == ["<b_2>"] and "missing from teacher file" in failures["failed"][0]["error"]
    sem = pd.read_parquet(tmp_path / "out" / "semantics.parquet")
    assert list(sem["status"]) == ["ok", "ok", "ok", "failed"] and set(sem["engine"]) == {"file"}


def test_limit_then_resume_skips_finished_tokens(catalogue, tmp_path):
    sids, teacher = catalogue
    out = tmp_path / "out"
    base = ["teacher.engine=file", f"teacher.file={teacher}"]
    first = extract_semantics(load_config(overrides=[*base, "teacher.limit=2"]), sids, tmp_path, out)
    assert first["tokens_requested"] == 2 and first["extracted_this_run"] == 2
    # the limit takes the levels in turn (<a_1>, <b_0>: each level's first in index order), so every depth gets semantics
    assert json.loads((out / "failures.json").read_text())["not_requested"] == ["<a_0>", "<b_2>"]
    second = extract_semantics(load_config(overrides=base), sids, tmp_path, out)
    assert second["resumed"] == 2 and second["extracted_this_run"] == 2
    # a failure under an unchanged greedy request would repeat: a plain rerun keeps it ...
    again = extract_semantics(load_config(overrides=base), sids, tmp_path, out)
    assert again["resumed"] == 4 and again["extracted_this_run"] == 0 and again["failed"] == 1
    # ... teacher.retry_failed=force requests the failed <b_2> again, the ok ones not
    third = extract_semantics(load_config(overrides=[*base, "teacher.retry_failed=force"]), sids, tmp_path, out)
    assert third["resumed"] == 3 and third["extracted_this_run"] == 1
    kept = extract_semantics(load_config(overrides=[*base, "teacher.retry_failed=false"]), sids, tmp_path, out)
    assert kept["resumed"] == 4 and kept["extracted_this_run"] == 0 and kept["failed"] == 1
    parts = pd.concat(pd.read_parquet(p) for p in (out / "parts").glob("part-*.parquet"))
    assert parts["token"].value_counts().to_dict() == {"<a_1>": 1, "<a_0>": 1, "<b_0>": 1, "<b_2>": 2}


def test_cli_and_named_errors(catalogue, tmp_path, capsys):
    sids, teacher = catalogue
    assert main(["semantics", "extract", "--sids", str(sids), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--engine", "file", "--file", str(teacher)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 3
    with pytest.raises(InputError, match="teacher.file"):
        extract_semantics(load_config(overrides=["teacher.engine=file"]), sids, tmp_path, tmp_path / "o2")
    with pytest.raises(InputError, match="items.parquet"):
        extract_semantics(load_config(overrides=["teacher.engine=hf"]), sids, tmp_path / "nodata", tmp_path / "o3")


@pytest.mark.ray
def test_vllm_processor_builds_and_cpu_cluster_is_refused(ray_cluster, catalogue, tmp_path):
    """The real ray.data.llm accepts our config and callables; running it needs a GPU (none here)."""
    import numpy as np
    import ray

    from tsrec.orchestration.semantics import build_vllm_processor
    from tsrec.pretrained import smollm2_hf_dir

    sids, _ = catalogue
    cfg = load_config(overrides=["teacher.engine=vllm", f"teacher.model={smollm2_hf_dir()}"])
    plan = str(build_vllm_processor(cfg, str(smollm2_hf_dir()))(ray.data.from_items([{"token": "<a_0>"}])))
    for stage in ("_preprocess", "ChatTemplateUDF", "vLLMEngineStageUDF", "DetokenizeUDF", "_postprocess"):
        assert stage in plan  # built lazily, never executed on CPU (STACK.md 5.2)
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame({"item_id": np.arange(3, dtype=np.int64), "title": ["a", "b", "c"], "description": ["", "", ""]}
                 ).to_parquet(data / "items.parquet", index=False)
    with pytest.raises(RuntimeError, match=r"needs 2 GPU\(s\) \(tensor_parallel_size=1 x concurrency=2\)"):
        extract_semantics(cfg, sids, data, tmp_path / "out")
