"""Checkpoint save/resume and Hugging Face export for DeepSpeed loops (SFT; reusable by RL). R5.

A checkpoint folder holds:
- ``ds/``: DeepSpeed ``save_checkpoint`` (model, optimizer and scheduler state; ZeRO shards per rank)
  with ``client_state`` = the loop state (step, data position, best validation loss, patience counter);
- ``rng/rank_<r>.pt``: python, numpy and torch RNG states of each rank;
- ``metrics.csv``: the metric rows so far (rank 0), so a resumed run continues the same curve.

Every rank writes into its own local folder; the caller's RunContext merges them (Ray Train merges all
ranks' folders into one checkpoint). ``export_hf`` gathers ZeRO-3 shards into one 16-bit state dict
(a collective: every rank must call it) and rank 0 writes a folder that ``from_pretrained`` and vLLM load.
"""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "ds"


def save_checkpoint(engine, ckpt_dir: Path, state: dict[str, Any], rank: int, metric_rows: list[dict]) -> None:
    """Write the DeepSpeed checkpoint, this rank's RNG state and (rank 0) the metric rows. Collective."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=TAG, client_state=dict(state))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng, ckpt_dir / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        write_metrics_csv(ckpt_dir / "metrics.csv", metric_rows)


def load_checkpoint(engine, ckpt_dir: Path, rank: int) -> tuple[dict[str, Any], list[dict]]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; return (client_state, metric rows)."""
    ckpt_dir = Path(ckpt_dir)
    _, state = engine.load_checkpoint(str(ckpt_dir), tag=TAG)
    if state is None:
        raise RuntimeError(f"{ckpt_dir}: DeepSpeed checkpoint could not be loaded")
    rng_file = ckpt_dir / "rng" / f"rank_{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    rows = read_metrics_csv(ckpt_dir / "metrics.csv")
    return state, rows


def export_hf(engine, tokenizer, out_dir: Path, zero_stage: int, rank: int, prefix: str = "lm.") -> None:
    """Write a Hugging Face folder (weights + config + tokenizer with SID tokens). Collective.

    ``engine.module`` wraps the causal LM as attribute ``lm`` (keys start with ``prefix``). A peft
    model is merged (LoRA and trainable token rows folded in) before saving.
    """
    out_dir = Path(out_dir)
    if zero_stage == 3:
        # Gathers every partition on every rank; rank 0 receives the full state dict (16-bit or fp32).
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    lm = engine.module.lm
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if hasattr(lm, "merge_and_unload"):  # peft: load the gathered values into a copy, merge, save
        merged = copy.deepcopy(lm)
        merged.load_state_dict(sd, strict=False)
        merged = merged.merge_and_unload()
        merged.save_pretrained(out_dir)
    else:
        lm.save_pretrained(out_dir, state_dict=sd)
    tokenizer.save_pretrained(out_dir)


def write_metrics_csv(path: Path, rows: list[dict]) -> None:
    """One row per step; columns = the union of keys (first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def read_metrics_csv(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [{k: _num(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def _num(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
