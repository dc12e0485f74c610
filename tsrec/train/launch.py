"""The torchrun entry of a training recipe: ``python -m torch.distributed.run --nproc_per_node N -m
tsrec.<stage>.loop --config F [--model M --data D --sids S --semantics T --out O] [key=value ...]``.

Inputs default to the pipeline's folders under ``run.out_dir``; checkpoints and outputs go to ``--out``
through a :class:`tsrec.runtime.LocalContext`. No Ray: the same recipe runs on Ray Train elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch


def torchrun_main(train_fn: Callable, prog: str, model_default: str, out_default: str,
                  argv: list[str] | None = None) -> int:
    """Parse the arguments, run ``train_fn(cfg, model, data, sids, semantics, ctx)``, print its summary
    (rank 0) and tear the process group down."""
    from tsrec.config import load_config
    from tsrec.runtime import LocalContext

    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config")
    for name in ("model", "data", "sids", "semantics", "out"):
        p.add_argument(f"--{name}")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    root = Path(cfg.run.out_dir)
    sem = Path(a.semantics) if a.semantics else root / "semantics" / "description_keywords.json"
    result = train_fn(cfg, Path(a.model or root / model_default), Path(a.data or root / "data"),
                      Path(a.sids or root / "sids"), sem if sem.exists() else None,
                      LocalContext(Path(a.out) if a.out else root / out_default))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2, default=str))
    # Tear the process group down before the interpreter exits: left to exit, gloo's threads are destroyed
    # while still joinable and a rank can abort ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0
