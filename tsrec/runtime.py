"""Where a training loop runs: the ``RunContext`` seam between core loops and Ray (STYLE.md 2).

A loop calls ``ctx.report(step, metrics, checkpoint_dir=None)``, reads ``ctx.resume_dir`` and hands
finished folders (best/final model, logs) to ``ctx.save_artifact``. Two implementations:

- :class:`LocalContext` (here): a single process or one torchrun rank. Rank and world size come from
  torchrun's environment (``RANK``, ``WORLD_SIZE``); checkpoints are copied to
  ``<root>/checkpoints/step_<n>`` (the last ``keep`` kept) and artifacts to ``<root>/<name>``.
- ``RayTrainContext`` (``tsrec/orchestration/train.py``): forwards to ``ray.train.report`` and
  ``ray.train.get_checkpoint``; artifacts go to the run's storage path.

This module imports no Ray.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol


class RunContext(Protocol):
    """What a training loop needs to know about where it runs."""

    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:<i>": where this rank computes

    @property
    def resume_dir(self) -> Path | None:
        """Folder of the checkpoint to resume from (the same layout the loop reported), or None."""

    def report(self, step: int, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Record metrics; with ``checkpoint_dir``, persist that folder as a checkpoint (every rank calls)."""

    def save_artifact(self, local_dir: Path, name: str) -> None:
        """Persist a finished folder (rank 0 calls) under ``name``, replacing an older one."""


class LocalContext:
    """Single process or torchrun: checkpoints and artifacts under one local ``root`` folder."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        import torch

        self.device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.metrics: list[dict[str, Any]] = []

    @property
    def checkpoints(self) -> list[Path]:
        base = self.root / "checkpoints"
        found = [p for p in base.glob("step_*") if (p / ".complete").exists()] if base.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    @property
    def resume_dir(self) -> Path | None:
        found = self.checkpoints
        return found[-1] if found else None

    def report(self, step: int, metrics: dict[str, Any], checkpoint_dir: Path | None = None) -> None:
        self.metrics.append({"step": step, **metrics})
        if checkpoint_dir is None:
            return
        dest = self.root / "checkpoints" / f"step_{step}"
        # Every rank merges its own files into the shared folder (same host under torchrun).
        shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
        _barrier(self.world_size)
        if self.rank == 0:
            (dest / ".complete").touch()
            for old in self.checkpoints[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.world_size)

    def save_artifact(self, local_dir: Path, name: str) -> None:
        dest = self.root / name
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(local_dir, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
