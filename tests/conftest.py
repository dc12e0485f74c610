"""Shared fixtures: one session-wide local Ray cluster (dashboard and job server on), tiny backbones.

The Ray cluster is started in-process with ``ray.init`` on free ports, so parallel test sessions on
one machine never collide, and ``ray.shutdown()`` tears down only this session's cluster.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
INDUSTRIAL = SHARED_DATA / "amazon" / "Industrial_and_Scientific"
INDUSTRIAL_TEACHER = SHARED_DATA / "tsrec" / "Industrial_and_Scientific" / "Industrial_and_Scientific.description_keywords.json"

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head for the whole session. Yields ``{"dashboard_url": ..., "address": ...}``."""
    import ray

    ctx = ray.init(
        num_cpus=4,  # logical: 2 Train workers + drivers/actors on a 2-core machine
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=_free_port(),
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}},
    )
    yield {"dashboard_url": f"http://{ctx.dashboard_url}", "address": ctx.address_info["gcs_address"]}
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny tokenizer + Qwen2 folder without SID tokens."""
    from tsrec.tiny import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"), texts=["heavy duty staples glue tape"])
