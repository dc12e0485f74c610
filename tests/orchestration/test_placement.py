"""Where zero-GPU work and evaluation run, and the vLLM teacher's pool (issue 19). Pure decisions, no Ray."""

from __future__ import annotations

import pytest

from tsrec.config import load_config


def test_cpu_only_runtime_env_hides_the_gpus_and_keeps_the_rest():
    from tsrec.orchestration.cluster import cpu_only_runtime_env

    user = {"env_vars": {"A": "1"}, "pip": ["x"]}
    env = cpu_only_runtime_env(user)
    assert env == {"env_vars": {"A": "1", "CUDA_VISIBLE_DEVICES": ""}, "pip": ["x"]}
    assert user == {"env_vars": {"A": "1"}, "pip": ["x"]}  # not modified
    assert cpu_only_runtime_env() == {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}


def test_embedding_actors_without_gpus_run_on_cpu_with_the_gpus_hidden():
    from tsrec.orchestration.embed import embed_placement

    assert embed_placement(0.0, "auto") == {"device": "cpu", "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}
    assert embed_placement(1.0, "auto") == {"device": "auto"}  # its own GPU, through Ray's CUDA_VISIBLE_DEVICES
    with pytest.raises(ValueError, match="gpus_per_worker=0"):
        embed_placement(0.0, "cuda")


def test_evaluation_never_decodes_in_a_cluster_driver():
    """On a cluster (RAY_ADDRESS / resources.ray_address) the driver is the head pod: even one worker is an actor."""
    from tsrec.orchestration.evaluate import eval_in_driver

    assert eval_in_driver(workers=1, on_cluster=True, gpus_per_worker=None) is False
    assert eval_in_driver(workers=1, on_cluster=True, gpus_per_worker=0) is False
    assert eval_in_driver(workers=4, on_cluster=False, gpus_per_worker=None) is False
    assert eval_in_driver(workers=1, on_cluster=False, gpus_per_worker=1) is False  # a GPU asked for: an actor
    assert eval_in_driver(workers=1, on_cluster=False, gpus_per_worker=None) is True  # laptop / CI: in-process


def test_eval_sees_gpus_an_autoscaler_can_add(monkeypatch):
    """A GPU group scaled to zero: the cluster has no GPU now, its autoscaler config says 16: GPU actors."""
    import ray
    import ray._private.state as state_mod

    from tsrec.orchestration.cluster import cluster_gpus
    from tsrec.orchestration.evaluate import resolve_eval_placement

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(state_mod.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 136, "GPU": 16})
    assert cluster_gpus() == 16
    assert resolve_eval_placement(None, "auto", cluster_gpus()) == (1.0, "auto")
    monkeypatch.setattr(state_mod.state, "get_max_resources_from_cluster_config", lambda: None)
    assert cluster_gpus() == 0


@pytest.mark.parametrize("rows, concurrency, batch, expect", [
    (1000, 4, 4, (32, 4)),     # GPU: batches of >= 32 rows, every engine used
    (1000, 4, 64, (64, 4)),    # a larger teacher.batch_size is kept
    (40, 4, 4, (10, 4)),       # few rows: an even split, still every engine busy
    (3, 4, 4, (1, 3)),         # a retry round of 3 rows starts 3 engines, not 4
])  # fmt: skip
def test_vllm_batches_fill_the_engines(rows, concurrency, batch, expect):
    from tsrec.orchestration.semantics import vllm_batching

    cfg = load_config(overrides=["teacher.engine=vllm", f"teacher.concurrency={concurrency}", f"teacher.batch_size={batch}"])
    assert vllm_batching(cfg, rows, cpu=False) == expect
    assert vllm_batching(cfg, rows, cpu=True)[0] == batch  # CPU engines keep teacher.batch_size


def test_vllm_engines_are_a_fixed_pool():
    """An int concurrency is an autoscaling pool 1..n in Ray 2.60; the processor gets (n, n)."""
    pytest.importorskip("ray.data.llm")
    from ray.data.llm import vLLMEngineProcessorConfig

    from tsrec.orchestration.semantics import vllm_processor_config
    from tsrec.semantics.teacher import VllmTeacher

    cfg = load_config(overrides=["teacher.engine=vllm", "teacher.concurrency=3", "teacher.batch_size=4"])
    teacher = VllmTeacher(**VllmTeacher.constructor_kwargs(cfg.teacher, 7, "/models/qwen", concurrency=3))
    kw = vllm_processor_config(teacher, batch_size=32)
    assert kw["concurrency"] == (3, 3) and kw["batch_size"] == 32
    assert vLLMEngineProcessorConfig(**kw).get_concurrency() == {"min_size": 3, "max_size": 3}
    assert vllm_processor_config(teacher, engines=1)["concurrency"] == (1, 1)
