"""The process group and the device of a training rank: one process, a torchrun rank or a Ray Train worker.

The device is decided once, from the run context (``ctx.device``: Ray Train's ``get_device()``, or
torchrun's ``LOCAL_RANK`` in :class:`tsrec.runtime.LocalContext`), never from
``torch.cuda.is_available()``. On a GPU host a Ray worker that asked for no GPU (``gpus_per_worker: 0``)
still sees every GPU (Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` alone), while Ray Train hands it ``cpu``:
it trains on CPU over gloo, and DeepSpeed is told so before it picks an accelerator.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Distributed:
    """Where this rank trains, as decided by :func:`init_distributed`."""

    rank: int
    world_size: int
    device: torch.device
    backend: str  # "nccl" (CUDA) or "gloo" (CPU)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def training_device(ctx) -> torch.device:
    """The device this rank computes on: the context's, whatever GPUs the process can see."""
    return torch.device(ctx.device)


def init_distributed(ctx) -> Distributed:
    """Set the device, then the process group (a 1-rank group for a single process: DeepSpeed needs one)."""
    device = training_device(ctx)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Before DeepSpeed's first import in this process: it picks its accelerator once, and on a GPU host
        # would pick CUDA for a CPU worker. An explicit DS_ACCELERATOR (tests, the GPU checks) is kept.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if on_gpu:
        torch.cuda.set_device(device)  # DeepSpeed places the engine on the current device
    else:  # skip the ~35 s shm-op JIT build on CPU (STACK.md 2); same losses
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    ensure_dist_env()
    backend = "nccl" if on_gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return Distributed(ctx.rank, ctx.world_size, device, backend)


def ensure_dist_env() -> None:
    """A single process without torchrun still needs a (1-rank) process group for DeepSpeed."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (a CPU tensor in, a CPU tensor out); the identity without a multi-rank group.
    NCCL reduces CUDA tensors only, so the sum travels on this rank's current GPU there."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t)
        t = t.cpu()
    return t
