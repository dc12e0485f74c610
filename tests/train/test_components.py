"""The shared training components (tsrec/train/) on their own: the device decision, the DeepSpeed dict
of each stage, the LR schedule, each rank's share of a step."""

import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch

from tsrec.config import ConfigError, load_config
from tsrec.train.distributed import init_distributed, training_device
from tsrec.train.engine import EngineSpec, deepspeed_config
from tsrec.train.sampling import rank_share
from tsrec.train.schedule import lr_lambda


def test_a_zero_gpu_worker_on_a_gpu_host_trains_on_cpu(monkeypatch):
    """A Ray Train worker with ``gpus_per_worker: 0`` on a GPU host: CUDA is visible (Ray 2.60 does not hide
    it) but Ray Train's device is cpu. The rank must train on CPU over gloo and never select a GPU (the old
    decision, ``torch.cuda.is_available()``, called ``torch.cuda.set_device(cpu)``: ValueError)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)

    def touched(*args, **kwargs):
        raise AssertionError("a CPU worker selected a GPU")

    monkeypatch.setattr(torch.cuda, "set_device", touched)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # unset, DeepSpeed would pick CUDA on a GPU host
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    created = not torch.distributed.is_initialized()
    try:
        dist = init_distributed(SimpleNamespace(rank=0, world_size=1, device="cpu"))
        assert dist.device == torch.device("cpu") and dist.backend == "gloo" and not dist.on_gpu
        assert torch.distributed.get_backend() == "gloo"
        assert os.environ["DS_ACCELERATOR"] == "cpu"  # told before DeepSpeed picks its accelerator
    finally:
        if created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    spec = EngineSpec.of("sft", load_config(None, []).sft, 4, 1)
    assert deepspeed_config(spec, 1, dist.on_gpu)["optimizer"]["params"]["torch_adam"]  # CPU: torch's AdamW


def test_the_device_is_the_contexts():
    assert training_device(SimpleNamespace(device="cuda:3")) == torch.device("cuda", 3)
    assert training_device(SimpleNamespace(device="cpu")) == torch.device("cpu")


def test_deepspeed_config_of_each_stage():
    cfg = load_config(None, ["rl.prompts_per_step=64", "rl.prompts_per_micro=4", "rl.group_size=16", "rl.lr=1e-4"])
    # RL: a micro-batch is prompts_per_micro groups of G rows; 2 workers -> 64 / (4 x 2) = 8 accumulation steps.
    rl = deepspeed_config(EngineSpec.of("rl", cfg.rl, micro_batch_size=4 * 16, grad_accum=8), world_size=2)
    assert (rl["train_micro_batch_size_per_gpu"], rl["gradient_accumulation_steps"], rl["train_batch_size"]) == (64, 8, 64 * 16)
    assert rl["optimizer"]["params"]["lr"] == 1e-4 and rl["gradient_clipping"] == cfg.rl.grad_clip
    assert rl["zero_optimization"]["overlap_comm"] is False  # CPU
    gpu3 = deepspeed_config(EngineSpec.of("sft", load_config(None, ["sft.zero_stage=3"]).sft, 8, 2), 2, on_gpu=True)
    from deepspeed.git_version_info import installed_ops

    assert gpu3["zero_optimization"]["overlap_comm"] is True
    # FusedAdam where the op is prebuilt (the cluster image), torch's AdamW where DeepSpeed would JIT-build it
    assert gpu3["optimizer"]["params"].get("torch_adam", False) is not bool(installed_ops.get("fused_adam"))
    with pytest.raises(ConfigError, match=r"rl\.lora\.enabled: LoRA runs with rl\.zero_stage 0 or 2"):
        deepspeed_config(EngineSpec.of("rl", load_config(None, ["rl.lora.enabled=true", "rl.zero_stage=3"]).rl, 1, 1), 1)


def test_lr_schedule():
    lin, cos, const = (lr_lambda(k, 10, 110) for k in ("linear", "cosine", "constant"))
    assert [lin(s) for s in (0, 5, 10, 60, 110, 200)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    assert cos(10) == 1.0 and math.isclose(cos(60), 0.5) and math.isclose(cos(110), 0.0, abs_tol=1e-12)
    assert math.isclose(cos(35), 0.5 * (1 + math.cos(math.pi / 4)))  # a quarter in: cosine, not linear (0.75)
    assert const(5) == 0.5 and const(10**6) == 1.0


def test_rank_share_covers_each_step_once():
    samples = list(range(20))
    cache: dict = {}
    seen = [x for step in range(4) for rank in range(2) for x in rank_share(samples, step, 4, 5, 7, rank, 2, cache)]
    assert seen[:10] == list(range(10))  # epoch 0 in file order
    assert sorted(seen) == samples  # one epoch: every sample once
    epoch1 = [x for step in range(4, 8) for rank in range(2) for x in rank_share(samples, step, 4, 5, 7, rank, 2, cache)]
    assert sorted(epoch1) == samples and epoch1 != samples  # a seeded permutation
