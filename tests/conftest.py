"""Shared fixtures: one session-wide local Ray cluster (dashboard and job server on), tiny backbones.

The Ray cluster is a real head started with ``ray start`` on free ports and joined in-process; see
the ``ray_cluster`` fixture.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from device_env import default_ds_accelerator
from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, REPO, SHARED_DATA, require_shared  # noqa: F401


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_ds = default_ds_accelerator(os.environ, _cuda_available)
if _ds is not None:
    os.environ["DS_ACCELERATOR"] = _ds
# Ray workers of the session cluster get the same choice (nothing on a GPU machine: DeepSpeed picks CUDA).
WORKER_ENV = {**({"DS_ACCELERATOR": _ds} if _ds is not None else {}), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray head (``ray start --head --block``) for the whole session, joined in-process.

    Every port is picked free, so parallel sessions on one machine never collide (``ray.init``
    cannot move the job agent off its fixed port), and terminating the ``--block`` process stops only
    this head. Yields ``{"dashboard_url": ..., "address": ...}``.
    """
    import subprocess
    import sys
    import time

    import ray

    ports = {name: _free_port() for name in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
        "ray-client-server-port")}  # fmt: skip
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus=4",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
           *[f"--{k}={v}" for k, v in ports.items()]]  # fmt: skip
    # Jobs run `python ...` from the head's PATH: make that this interpreter (the venv), as a cluster
    # image would, even when the tests were started as `.venv/bin/python -m pytest` without activation.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path_factory.mktemp("ray_head") / "head.log", "w")
    # Own process group: teardown signals the head and every process it started, and nothing else.
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{ports['port']}"
    deadline = time.time() + 120
    while True:
        try:
            ray.init(address=address, configure_logging=False, log_to_driver=False,
                     runtime_env={"env_vars": dict(WORKER_ENV)})
            break
        except Exception:  # GCS not up yet
            if head.poll() is not None or time.time() > deadline:
                head.kill()
                raise RuntimeError(f"ray head did not start; see {log.name}") from None
            time.sleep(1)
    try:
        yield {"dashboard_url": f"http://127.0.0.1:{ports['dashboard-port']}", "address": address}
    finally:
        ray.shutdown()
        _stop_process_group(head)
        log.close()


def _stop_process_group(proc) -> None:
    """SIGTERM the head's group, SIGKILL what is left after 5 s (a graceful `ray stop` takes ~30 s)."""
    import signal
    import subprocess
    import time

    pgid = os.getpgid(proc.pid)
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)  # raises once no process of the group is left
        except ProcessLookupError:
            return
        time.sleep(0.5)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny tokenizer + Qwen2 folder without SID tokens."""
    from tsrec.tiny import save_tiny_backbone

    return save_tiny_backbone(tmp_path_factory.mktemp("tiny_backbone"), texts=["heavy duty staples glue tape"])
