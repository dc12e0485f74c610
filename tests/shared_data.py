"""Paths of the data under ../shared/data that tests read (never copied into the repo)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
INDUSTRIAL = SHARED_DATA / "amazon" / "Industrial_and_Scientific"
INDUSTRIAL_TEACHER = SHARED_DATA / "tsrec" / "Industrial_and_Scientific" / "Industrial_and_Scientific.description_keywords.json"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path
