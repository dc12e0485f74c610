"""configs/industrial_cpu.yaml shortened: the real Industrial data, the authors' SID index imported as the SID
stage, their teacher file, SA-Init, a few SFT steps on the session's Ray cluster, evaluation on 48 test rows
with the baselines (SASRec 1 epoch) and the published rows in the report. The full run is not part of the
suite (about 30 minutes): docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, require_shared
from tsrec.config import load_config

REPO = Path(__file__).resolve().parents[2]
SHORT = ["sft.max_steps=4", "sft.eval_every_steps=2", "sft.save_every_steps=4", "sft.log_every_steps=2",
         "sft.warmup_steps=0", "sft.max_eval_samples=16", "eval.max_rows=48", "eval.beams=5", "eval.ks=[3,5]",
         "eval.sasrec_epochs=1", "sft.valid_ranking_sample=16", "sft.valid_ranking_beams=10"]


@pytest.mark.ray
def test_industrial_cpu_config_runs_shortened(ray_cluster, tmp_path, monkeypatch):
    from tsrec.orchestration.pipeline import run_pipeline
    from tsrec.report import write_report

    require_shared(INDUSTRIAL)
    require_shared(INDUSTRIAL_TEACHER)
    monkeypatch.chdir(REPO)  # the config names ../shared/data relative to the repository root
    cfg = load_config(REPO / "configs" / "industrial_cpu.yaml", [f"run.out_dir={tmp_path / 'run'}", *SHORT])
    logs: list[str] = []
    run_pipeline(cfg, log=logs.append)
    root = tmp_path / "run"

    sid = json.loads((root / "sids" / "stats.json").read_text())
    assert sid["items"] == 3686 and sid["levels"] == 3
    assert json.loads((root / "sids" / "index.json").read_text()) == json.loads(
        (INDUSTRIAL / "index" / "Industrial_and_Scientific.index.json").read_text())
    init = json.loads((root / "model" / "init_report.json").read_text())
    assert init["sa_init_rows"] == 560 and init["missing_semantics"] == []  # every token of the 3 levels
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics["rows"] == 48 and metrics["invalid_sids"] == 0 and metrics["beams"] == 5
    assert {"popularity", "markov", "sasrec"} <= set(metrics["baselines"])
    report = write_report(root)
    text = Path(report["markdown"]).read_text()
    assert "sasrec (baseline, trained here)" in text
    assert "MiniOneRec (SFT+RL) (published)" in text and "0.1586" not in text  # only the run's cut-offs (3, 5)
    assert "0.1321" in text  # MiniOneRec's published HR@5
