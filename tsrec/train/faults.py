"""Fault injection for the resume tests (``<stage>.fail_at_step``, ``<stage>.fail_marker``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def maybe_fail(fail_at_step: int, fail_marker: str, step: int, rank: int, world: int, tag: str) -> None:
    """After step ``fail_at_step`` the last rank dies once, as a crashed worker would (SIGKILL). With a
    ``fail_marker`` file it dies only the first time (the marker survives the restart)."""
    if step != fail_at_step or rank != world - 1:
        return
    marker = Path(fail_marker) if fail_marker else None
    if marker is not None and marker.exists():
        return
    if marker is not None:
        marker.touch()
    print(f"[{tag}] fault injection: rank {rank} SIGKILLs itself after step {step}", flush=True)
    # Ray Train's controller polls each worker's last report (a queue of one); a kill within
    # milliseconds of a checkpoint report can beat that poll on a loaded machine, and the restart then
    # finds an older checkpoint. A crash in a real run comes long after its last report.
    time.sleep(3.0)
    os.kill(os.getpid(), signal.SIGKILL)
