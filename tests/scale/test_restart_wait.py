"""``resources.sft.restart_wait_s``: the bound on how long a (re)start of the Ray Train group waits for
nodes (a lost node's replacement). Checked on the objects handed to Ray Train, without a cluster: Ray's
own timeout path (WorkerGroupStartupTimeoutError, then ControllerError when controller_failure_limit is
exhausted) is Ray's."""

from __future__ import annotations

import os

import pytest

from tsrec.config import ConfigError, load_config
from tsrec.orchestration.storage import START_TIMEOUT_ENV, failure_config, restart_wait


def test_default_waits_like_ray():
    res = load_config(None, []).resources.sft
    assert res.restart_wait_s == 0 and res.placement_strategy == "PACK"
    fc = failure_config(2, res.restart_wait_s)
    assert fc.max_failures == 2 and fc.controller_failure_limit == -1  # Ray's default: retry without limit


def test_bounded_wait_fails_after_the_timeout(monkeypatch):
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    fc = failure_config(3, 90.0)
    assert fc.max_failures == 3 and fc.controller_failure_limit == 0  # a start timeout ends the run
    with restart_wait(90.0):
        assert os.environ[START_TIMEOUT_ENV] == "90.0"  # read by fit() when it creates the controller
    assert START_TIMEOUT_ENV not in os.environ
    monkeypatch.setenv(START_TIMEOUT_ENV, "7")
    with restart_wait(0):
        assert os.environ[START_TIMEOUT_ENV] == "7"  # 0 leaves a user's own setting alone
    with restart_wait(30):
        pass
    assert os.environ[START_TIMEOUT_ENV] == "7"


def test_bad_values_are_named_errors():
    with pytest.raises(ConfigError, match="restart_wait_s"):
        failure_config(2, -1.0)
    with pytest.raises(ConfigError, match="resources.sft.placement_strategy"):
        load_config(None, ["resources.sft.placement_strategy=SIDEWAYS"])
    with pytest.raises(ConfigError, match="gs://"):
        from tsrec.orchestration.storage import filesystem

        filesystem("gs://bucket/x", "http://127.0.0.1:9000")
