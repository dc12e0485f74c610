"""A quiet `tsrec run` console (issue 10): Ray's INFO lines and progress go to <out>/logs/ray.log, warnings
stay on the console, and Ray Data actor pools no longer trigger Ray core's ERROR line about
max_restarts."""

from __future__ import annotations

import logging

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


def test_ray_info_goes_to_the_log_file_and_warnings_stay(tmp_path, capsys, restore_ray_loggers):
    import ray.data

    path = quiet_console(tmp_path / "logs")
    data_log = logging.getLogger("ray.data._internal.execution.streaming_executor")
    data_log.info("Starting execution of Dataset demo_0")
    logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
    data_log.warning("Operator is backpressured: low memory")
    logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
    err = capsys.readouterr().err
    text = path.read_text()
    assert "Starting execution of Dataset demo_0" in text and "Started a local Ray instance." in text
    assert "Starting execution" not in err and "Started a local Ray instance" not in err
    assert "Operator is backpressured: low memory" in err  # a warning that matters stays visible
    assert "Progress bars disabled" not in err  # the expected consequence of quiet mode is not news
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
