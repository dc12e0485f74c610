"""A quiet `tsrec run` console (issue 10): Ray's INFO lines and progress go to <out>/logs/ray.log, warnings
stay on the console, and Ray Data actor pools no longer trigger Ray core's ERROR line about
max_restarts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tsrec.orchestration.cluster import quiet_console


@pytest.fixture
def restore_ray_loggers():
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = {n: [(h, h.level, list(h.filters)) for h in logging.getLogger(n).handlers] for n in ("ray", "ray.data")}
    bars = ctx.enable_progress_bars
    yield
    ctx.enable_progress_bars = bars
    for n, handlers in saved.items():
        logger = logging.getLogger(n)
        for h in list(logger.handlers):
            if all(h is not s for s, _, _ in handlers):
                logger.removeHandler(h)
                h.close()
        for h, level, filters in handlers:
            h.setLevel(level)
            h.filters[:] = filters


def _console_handlers(name: str) -> list[logging.Handler]:
    return [h for h in logging.getLogger(name).handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def _shown(handler: logging.Handler, logger: logging.Logger, level: int, msg: str) -> bool:
    record = logger.makeRecord(logger.name, level, __file__, 0, msg, (), None)
    return record.levelno >= handler.level and bool(handler.filter(record))


def test_ray_info_goes_to_the_log_file_and_warnings_stay(tmp_path, restore_ray_loggers):
    """Checked on Ray's own console handlers rather than on captured stderr: they keep the stderr object
    of whoever imported ray first, which in a full suite is an earlier test's capture."""
    import ray.data

    path = quiet_console(tmp_path / "logs")
    data_log = logging.getLogger("ray.data._internal.execution.streaming_executor")
    data_log.info("Starting execution of Dataset demo_0")
    logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
    text = path.read_text()
    assert "Starting execution of Dataset demo_0" in text and "Started a local Ray instance." in text
    consoles = _console_handlers("ray") + _console_handlers("ray.data")
    assert consoles, "Ray installs console handlers on 'ray' and 'ray.data'"
    progress = logging.getLogger("ray.data._internal.progress")
    for h in consoles:
        assert not _shown(h, data_log, logging.INFO, "Starting execution of Dataset demo_0")
        assert _shown(h, data_log, logging.WARNING, "Operator is backpressured: low memory")  # stays visible
        assert not _shown(h, progress, logging.WARNING, "Progress bars disabled. To enable, set ...")
    assert ray.data.DataContext.get_current().enable_progress_bars is False


@pytest.mark.ray
def test_data_actor_pool_has_no_core_worker_error_line(ray_cluster, capfd):
    """Ray core logs (at ERROR, from C++ to the driver's stderr) for an actor created with max_restarts > 0
    and constructor arguments in the object store, which every Ray Data actor pool does by default."""
    import ray

    from tsrec.orchestration.cluster import DATA_ACTOR_POOL_ARGS

    class AddOne:
        def __call__(self, batch):
            return {"id": batch["id"] + 1}

    ds = ray.data.range(8, override_num_blocks=2).map_batches(
        AddOne, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_format="numpy", **DATA_ACTOR_POOL_ARGS)
    assert sorted(r["id"] for r in ds.take_all()) == list(range(1, 9))
    err = capfd.readouterr().err
    assert "max_restarts > 0" not in err



@pytest.mark.ray
def test_quiet_train_worker_drops_the_per_report_lines_and_deepspeeds_torch_warning(ray_cluster, tmp_path):
    import json

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Defined here so that cloudpickle ships it by value: the workers cannot import this test module.
    def _report_once(config):
        """A Ray Train worker: rank 0 runs as a quiet run's worker, rank 1 as a verbose one; each counts the
        "Reporting training result" records that get past Ray Train's file-path-named logger, and the
        FutureWarnings that get past the filters when the warning DeepSpeed's ZeRO-2 causes is raised."""
        import json
        import os
        import warnings

        import ray.train

        from tsrec.orchestration.cluster import quiet_train_worker

        rank = ray.train.get_context().get_world_rank()
        if rank == 0:
            os.environ["TSREC_QUIET"] = "1"
        else:  # the cluster may have started after an earlier test's quiet_console set it in this process
            os.environ.pop("TSREC_QUIET", None)
        quiet_train_worker()
        from ray.train.v2._internal.execution import context as train_context

        seen = []

        class Count(logging.Handler):  # a logger's handlers see only records that pass its level
            def emit(self, record):
                seen.append(record.getMessage())

        logging.getLogger(train_context.__file__).addHandler(Count())
        ray.train.report({"loss": 1.0})
        with warnings.catch_warnings(record=True) as caught:  # keeps the filters quiet_train_worker set
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                          "`torch.distributed.all_gather_single` instead.", FutureWarning)
        with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
            json.dump({"reports": [m for m in seen if m.startswith("Reporting training result")],
                       "warnings": [str(w.message) for w in caught]}, f)

    TorchTrainer(_report_once, train_loop_config={"out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name="quiet", storage_path=str(tmp_path / "runs"))).fit()
    quiet, verbose = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert verbose["reports"], "the verbose worker logs Ray Train's per-report line (else this test sees nothing)"
    assert quiet["reports"] == []
    assert len(verbose["warnings"]) == 1, "the verbose worker shows the warning (else this test sees nothing)"
    assert quiet["warnings"] == []


_STATE_API_PROBE = r"""
import os, sys
import ray
from tsrec.config import load_config
from tsrec.orchestration.cluster import ensure_ray

ensure_ray(load_config(None, []))


@ray.remote(num_cpus=0)
class Probe:
    def own_state(self):
        # What Ray Train's PlacementGroupCleaner does from its actor: ask the State API about an actor of
        # this cluster, with no address given.
        from ray.util.state import get_actor

        me = ray.get_runtime_context().get_actor_id()
        try:
            return "found" if get_actor(me, timeout=60) is not None else "not found"
        except Exception as e:  # the traceback a run printed: RpcError "Timed out while waiting for GCS"
            return f"{type(e).__name__}: {e}"


print("STATE", ray.get(Probe.remote().own_state.remote()))
print("DRIVER_API", os.environ.get("RAY_API_SERVER_ADDRESS"))  # restored: later connections go elsewhere
ray.shutdown()
"""


@pytest.mark.ray
def test_a_local_clusters_actors_reach_its_own_state_api(tmp_path):
    """Ray Train's PlacementGroupCleaner (one per trainer) asks the State API whether the controller lives.
    With no address it follows /tmp/ray/ray_current_cluster, which a local in-process cluster does not
    write: it dialled a cluster that ran there before and printed an RpcError traceback into the run's
    console. ensure_ray names the local cluster's own State API server for every process it starts.
    A dead cluster's address is written into an isolated /tmp/ray file first, as a stale one on a user's
    machine would be (RAY_TMPDIR moves Ray's temp dir, so the machine's real file is not touched)."""
    import os
    import subprocess
    import sys

    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="tsrec-", dir="/tmp"))  # short: Ray's socket paths live below it
    try:
        (root / "ray").mkdir()
        (root / "ray" / "ray_current_cluster").write_text("127.0.0.1:9")  # nothing listens on port 9
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(RAY_TMPDIR=str(root), TMPDIR=str(root))
        out = subprocess.run([sys.executable, "-c", _STATE_API_PROBE], env=env, capture_output=True, text=True,
                             timeout=240)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith(("STATE", "DRIVER_API"))]
    assert line == ["STATE found", "DRIVER_API None"], (out.stdout[-2000:], out.stderr[-3000:])
