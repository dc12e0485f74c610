"""Checkpoint save/resume and Hugging Face export for DeepSpeed loops (SFT; reusable by RL). R5.

A checkpoint folder holds:
- ``ds/``: DeepSpeed ``save_checkpoint`` (model, optimizer and scheduler state; ZeRO shards per rank)
  with ``client_state`` = the loop state (step, data position, best validation loss, patience counter);
- ``rng/rank_<r>.pt``: python, numpy and torch RNG states of each rank;
- ``metrics.csv``: the metric rows so far (rank 0), so a resumed run continues the same curve;
- ``meta.json`` (rank 0): the run identity (:func:`run_identity`) and the LR horizon. A checkpoint is
  loaded only by a run with the same meta, so a changed config never continues an old run's weights.

Every rank writes into its own local folder; the caller's RunContext merges them (Ray Train merges all
ranks' folders into one checkpoint). ``export_hf`` gathers ZeRO-3 shards into one 16-bit state dict
(a collective: every rank must call it) and rank 0 writes a folder that ``from_pretrained`` and vLLM load.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "ds"
META = "meta.json"

# `sft` keys that do not change what a training step computes: log/save cadence, where checkpoints
# go, fault tolerance and the test hook. `max_steps` only says how far to go, so a run extended to
# more steps resumes; its one effect on the computation, the LR horizon, is checked via the meta.
NON_IDENTITY_KEYS = ("log_every_steps", "save_every_steps", "storage_path", "max_failures", "fail_at_step",
                     "fail_marker", "max_steps")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint was written by a run with another identity (config, inputs or world size)."""


def run_identity(cfg, inputs: dict[str, Path | None], world_size: int) -> str:
    """Identity of an SFT run: a hash of what determines its weights.

    The resolved ``sft`` section (minus :data:`NON_IDENTITY_KEYS`), ``prompts``, ``run.seed``, the
    world size (ZeRO shards and the data split depend on it) and a fingerprint of each input (file
    sizes and mtimes, ``tsrec.artifacts.describe_input``; not the path, so a moved folder is the same).
    """
    from tsrec.artifacts import describe_input

    full = cfg.to_dict()
    sft = {k: v for k, v in full["sft"].items() if k not in NON_IDENTITY_KEYS}
    fingerprints = {k: ({x: y for x, y in describe_input(v).items() if x != "path"} if v is not None else None)
                    for k, v in sorted(inputs.items())}
    payload = {"sft": sft, "prompts": full["prompts"], "seed": full["run"]["seed"], "world_size": world_size,
               "inputs": fingerprints}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(engine, ckpt_dir: Path, state: dict[str, Any], rank: int, metric_rows: list[dict],
                    meta: dict[str, Any] | None = None) -> None:
    """Write the DeepSpeed checkpoint, this rank's RNG state and (rank 0) the metric rows and ``meta``
    (identity). Collective."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=TAG, client_state=dict(state))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    (ckpt_dir / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng, ckpt_dir / "rng" / f"rank_{rank}.pt")
    if rank == 0:
        write_metrics_csv(ckpt_dir / "metrics.csv", metric_rows)
        if meta is not None:
            (ckpt_dir / META).write_text(json.dumps(meta, sort_keys=True))


def check_meta(ckpt_dir: Path, expected: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``ckpt_dir``'s meta has every expected value."""
    path = Path(ckpt_dir) / META
    found = json.loads(path.read_text()) if path.exists() else {}
    diff = {k: (found.get(k, "<missing>"), v) for k, v in expected.items() if found.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} != this run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointMismatchError(
            f"{ckpt_dir}: checkpoint belongs to another run ({detail}); it is not loaded. Start over in a new "
            "output folder, or delete its checkpoints/ to retrain with this config")


def load_checkpoint(engine, ckpt_dir: Path, rank: int,
                    expect_meta: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict]]:
    """Restore engine (model, optimizer, scheduler) and this rank's RNG; return (client_state, metric rows).

    With ``expect_meta`` the checkpoint's meta (identity) is checked first, before anything is loaded."""
    ckpt_dir = Path(ckpt_dir)
    if expect_meta is not None:
        check_meta(ckpt_dir, expect_meta)
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
    model is exported merged (LoRA deltas and trainable token rows folded in, :func:`merged_state_dict`)
    without copying the model: training may continue after a ``best`` export.
    """
    out_dir = Path(out_dir)
    lm = engine.module.lm
    if hasattr(lm, "get_base_model"):  # peft (LoRA runs on ZeRO 0/2 only: rank 0 holds every weight)
        if rank == 0:
            base = lm.get_base_model()
            base.save_pretrained(out_dir, state_dict=merged_state_dict(lm))
            tokenizer.save_pretrained(out_dir)
        return
    if zero_stage == 3:
        # Gathers every partition on every rank; rank 0 receives the full state dict (16-bit or fp32).
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    lm.save_pretrained(out_dir, state_dict=sd)
    tokenizer.save_pretrained(out_dir)


def merged_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The plain transformers state dict of a peft LoRA model, adapters merged, the model untouched.

    Walks the base model's modules: ordinary parameters and buffers are taken by reference; a LoRA layer
    contributes ``W + B @ A * scale`` (peft's ``get_delta_weight``) under its base layer's names; a
    trainable-token wrapper contributes its weight with the trained rows swapped in. Extra memory is one
    new tensor per LoRA-targeted weight and per token-trained matrix, never a copy of the whole model
    (``copy.deepcopy`` + ``merge_and_unload`` doubled it on rank 0). A tied head is left out (transformers
    ties it again on load).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import TrainableTokensWrapper

    base = peft_model.get_base_model()
    tied = bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False))
    head = base.get_output_embeddings()
    sd: dict[str, torch.Tensor] = {}

    def walk(mod: torch.nn.Module, prefix: str) -> None:
        if tied and mod is head:
            return
        if isinstance(mod, LoraLayer):
            layer = mod.get_base_layer()
            weight = layer.weight.detach()
            for name in mod.active_adapters:
                if name not in mod.lora_A:
                    continue
                if name in getattr(mod, "lora_variant", {}) or getattr(mod, "lora_bias", {}).get(name):
                    raise ValueError(f"{prefix}: export merges plain LoRA only (no DoRA/variants, no lora_bias)")
                weight = weight + mod.get_delta_weight(name).detach().to(weight.dtype)
            sd[prefix + "weight"] = weight
            for pname, p in layer.named_parameters(recurse=False):
                if pname != "weight":
                    sd[prefix + pname] = p.detach()
            return
        if isinstance(mod, TrainableTokensWrapper):
            adapter = mod.token_adapter
            sd[prefix + "weight"] = adapter.get_merged_weights(adapter.active_adapters).detach()
            return
        for pname, p in mod.named_parameters(recurse=False):
            sd[prefix + pname] = p.detach()
        for bname, b in mod.named_buffers(recurse=False):
            if bname not in mod._non_persistent_buffers_set:
                sd[prefix + bname] = b
        for cname, child in mod.named_children():
            walk(child, f"{prefix}{cname}.")

    walk(base, "")
    return sd


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
