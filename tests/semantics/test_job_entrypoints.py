"""jobs/semantics.py and jobs/model_init.py run the same code as the CLI (as `ray job submit` would start them)."""

import json
import subprocess
import sys
from pathlib import Path

from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, require_shared

REPO = Path(__file__).resolve().parents[2]


def test_job_entrypoints_file_engine_then_model_init(tmp_path):
    require_shared(INDUSTRIAL_TEACHER)
    sem, mdl = tmp_path / "semantics", tmp_path / "model"
    run = [sys.executable, "jobs/semantics.py", "--sids", str(INDUSTRIAL), "--data", str(tmp_path), "--out", str(sem),
           "--engine", "file", "--file", str(INDUSTRIAL_TEACHER)]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["ok"] == 560
    run = [sys.executable, "jobs/model_init.py", "--sids", str(INDUSTRIAL), "--semantics", str(sem / "description_keywords.json"),
           "--depth", "3", "--out", str(mdl), "model.tiny=true"]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["sa_init_rows"] == 560 and (mdl / "manifest.json").exists()
