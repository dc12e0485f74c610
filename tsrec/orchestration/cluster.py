"""Joining or starting Ray: the one place that decides which cluster a stage runs on."""

from __future__ import annotations

import os

import ray

from tsrec.config import Config


def ray_address(cfg: Config) -> str:
    """``resources.ray_address``, else ``RAY_ADDRESS`` (set under `ray job submit`), else "local".

    A bare ``ray.init()`` would join whatever cluster ``/tmp/ray/ray_current_cluster`` names, possibly
    another user's on a shared machine; "local" always starts a fresh in-process cluster.
    ``resources.ray_address=auto`` joins the running one on purpose.
    """
    return cfg.resources.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def ensure_ray(cfg: Config) -> None:
    """Connect unless this process is already connected (tests and `tsrec run` connect once)."""
    if not ray.is_initialized():
        # Never pass num_cpus when joining a cluster (STACK.md 3.4).
        ray.init(address=ray_address(cfg), configure_logging=False)
