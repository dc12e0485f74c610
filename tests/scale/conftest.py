"""Fixtures for the scale-out tests: a real multi-node Ray cluster on this machine and a local S3 server.

``multinode_cluster`` starts ``ray.cluster_utils.Cluster``: a head raylet with 0 CPUs (it hosts only the
driver and Ray Train's controller, as a KubeRay head with ``num-cpus: 0``) and two worker raylets of two
CPUs each, every one with its own object store. The session-wide ``ray_cluster`` (tests/conftest.py) may be
connected already; this driver connection is saved and restored afterwards, so tests that follow keep it.
"""

from __future__ import annotations

import os
import socket

import pytest

from s3_server import S3_TEST_ENV, moto_s3

# Worker environment (the job's runtime_env, as a RayJob sets it): CPU DeepSpeed, offline HF, one thread,
# and S3 credentials for the moto server (moto accepts any; real pods get theirs from a Secret or IAM role).
# AWS_EC2_METADATA_DISABLED: without it the AWS SDK first probes the EC2 metadata service for credentials.
WORKER_ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **S3_TEST_ENV}
# Read by the GCS and raylets this fixture starts (they inherit this process's environment). On a loaded
# 2-core machine a raylet's dashboard agent took 45 s to come up; Ray's defaults (30 s for the agent to
# register, 30 s for the raylet to appear in the GCS) then abort the node's start. A fixed
# metrics_agent_port (add_node) spares the raylet its 20 s wait for the agent's port file.
RAY_START_ENV = {"RAY_agent_register_timeout_ms": "240000", "RAY_raylet_start_wait_time_s": "240"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiNode:
    """The running cluster: ``workers`` are the worker raylets (``ray._private.node.Node``), in order."""

    def __init__(self, cluster):
        self.cluster = cluster

    @property
    def workers(self) -> list:
        return list(self.cluster.worker_nodes)

    def add_worker(self):
        """A worker node of 2 CPUs (room for both workers: only the placement strategy spreads them), as a
        KubeRay worker pod that (re)joins; returns its ``Node``.

        Three tries: on a loaded machine a raylet can die waiting for its dashboard agent (Ray waits a
        fixed 20 s for the agent's port file), as a pod that crashes at start and is restarted."""
        for attempt in range(3):
            try:
                node = self.cluster.add_node(num_cpus=2, object_store_memory=80 * 1024**2,
                                             metrics_export_port=_free_port(), runtime_env_agent_port=_free_port(),
                                             metrics_agent_port=_free_port())
                break
            except Exception:  # Ray raises a bare Exception ("The current node timed out during startup")
                if attempt == 2:
                    raise
        self.cluster.wait_for_nodes()
        return node

    def remove(self, node_id: str) -> None:
        """Kill the worker node ``node_id`` (raylet, object store and its worker processes) without grace,
        as a deleted or crashed pod."""
        (node,) = [n for n in self.cluster.worker_nodes if n.node_id == node_id]
        self.cluster.remove_node(node, allow_graceful=False)

    def alive_node_ids(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


@pytest.fixture(scope="module")
def multinode_cluster():
    import shutil
    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="tsrec-mn-", dir="/tmp")
    saved_env = {k: os.environ.get(k) for k in RAY_START_ENV}
    os.environ.update(RAY_START_ENV)
    previous = None
    if ray.is_initialized():  # the session's ray_cluster: reconnect to it afterwards
        ctx = ray.get_runtime_context()
        previous = (ctx.gcs_address, ctx.runtime_env)
        ray.shutdown()
    cluster = Cluster(initialize_head=False)
    multi = MultiNode(cluster)
    try:
        for attempt in range(3):
            try:
                # Own temp dir (short: Ray's socket paths must fit 107 bytes): its processes are findable.
                cluster.add_node(num_cpus=0, include_dashboard=False, object_store_memory=80 * 1024**2,
                                 temp_dir=temp_dir, gcs_server_port=_free_port(),
                                 dashboard_agent_listen_port=_free_port(), metrics_export_port=_free_port(),
                                 runtime_env_agent_port=_free_port(), ray_client_server_port=_free_port(),
                                 metrics_agent_port=_free_port(), dashboard_port=_free_port())
                break
            except Exception:  # a head that timed out at start (loaded machine): stop what it started, retry
                _kill_processes_under(temp_dir)
                if attempt == 2:
                    raise
        for _ in range(2):
            multi.add_worker()
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": WORKER_ENV})
        yield multi
    finally:
        ray.shutdown()
        cluster.shutdown()
        _restore_env(saved_env)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if previous is not None:
            ray.init(address=previous[0], configure_logging=False, log_to_driver=False, runtime_env=previous[1])


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server with bucket ``tsrec-ckpt`` (``tests/s3_server.py``); the driver has the test
    credentials in its environment for the module."""
    with moto_s3() as s3:
        yield s3


def _kill_processes_under(temp_dir: str) -> None:
    """SIGKILL this test's own Ray processes of a failed start: those whose command line names ``temp_dir``."""
    import signal

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmd:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
