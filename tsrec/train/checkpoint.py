"""Checkpoints of a DeepSpeed training run: identity, save, resume, Hugging Face export (R5).

A checkpoint folder holds:
- ``ds/``: DeepSpeed ``save_checkpoint`` (model, optimizer and scheduler state; ZeRO shards per rank)
  with ``client_state`` = the loop state (step, data position, best validation score, patience counter);
- ``rng/rank_<r>.pt``: python, numpy and torch RNG states of each rank;
- ``metrics.csv``: the metric rows so far (rank 0), so a resumed run continues the same curve;
- ``meta.json`` (rank 0): the run identity (:func:`run_identity`) and the LR horizon. A checkpoint is
  loaded only by a run with the same meta, so a changed config never continues an old run's weights.
- whatever a recipe adds (RL: its reference weights), through ``save_extra`` of :func:`save_and_report`.

Every rank writes into its own local folder; the caller's RunContext merges them (Ray Train merges all
ranks' folders into one checkpoint). ``export_hf`` gathers ZeRO-3 shards into one 16-bit state dict
(a collective: every rank must call it) and rank 0 writes a folder that ``from_pretrained`` and vLLM load.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsrec.train.metrics import read_metrics_csv, write_metrics_csv

TAG = "ds"
META = "meta.json"



class CheckpointMismatchError(RuntimeError):
    """A checkpoint was written by a run with another identity (config, inputs or world size)."""


def run_identity(cfg, section: str, non_identity_keys: Iterable[str], inputs: dict[str, Path | None],
                 world_size: int, extra: dict[str, Any] | None = None) -> str:
    """Identity of a training run: a hash of what determines its weights.

    The resolved config ``section`` (``sft``, ``rl``) minus ``non_identity_keys`` (log/save cadence, where
    checkpoints go, fault tolerance, test hooks, ``max_steps``: they do not change what a step computes),
    ``prompts``, ``run.seed``, the world size (ZeRO shards and the data split depend on it), ``extra``
    (other config a recipe's steps read) and a fingerprint of each input (file sizes and mtimes,
    ``tsrec.artifacts.describe_input``; not the path, so a moved folder is the same).
    """
    from tsrec.artifacts import describe_input

    full = cfg.to_dict()
    skip = set(non_identity_keys)
    fingerprints = {k: ({x: y for x, y in describe_input(v).items() if x != "path"} if v is not None else None)
                    for k, v in sorted(inputs.items())}
    payload = {section: {k: v for k, v in full[section].items() if k not in skip}, "prompts": full["prompts"],
               "seed": full["run"]["seed"], "world_size": world_size, **(extra or {}), "inputs": fingerprints}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(engine, ckpt_dir: Path, state: dict[str, Any], rank: int, metric_rows: list[dict],
                    meta: dict[str, Any] | None = None) -> None:
    """Write the DeepSpeed checkpoint, this rank's RNG state and (rank 0) the metric rows and ``meta``
    (identity). Collective."""
    ckpt_dir = Path(ckpt_dir)
    engine.save_checkpoint(str(ckpt_dir), tag=TAG, client_state=dict(state))
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if engine.device.type == "cuda":  # a CPU rank on a GPU host leaves the GPUs alone
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
        if "cuda" in rng and engine.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    rows = read_metrics_csv(ckpt_dir / "metrics.csv")
    return state, rows


def resume(engine, ctx, rank: int, meta: dict[str, Any], state: dict[str, Any], tag: str) -> list[dict]:
    """Continue from ``ctx.resume_dir`` if there is one: engine and RNG restored, the keys of ``state``
    updated from the checkpoint's loop state; returns the metric rows up to its step (else ``[]``)."""
    if ctx.resume_dir is None:
        return []
    loaded, rows = load_checkpoint(engine, ctx.resume_dir, rank, expect_meta=meta)
    state.update({k: loaded[k] for k in state if k in loaded})
    if rank == 0:
        print(f"[{tag}] resumed from {ctx.resume_dir} after step {state['step']}", flush=True)
    return [r for r in rows if r.get("step", -1) <= state["step"]]


def release_resume(ctx) -> None:
    """A downloaded (cloud) checkpoint is no longer needed once everything is loaded from it."""
    release = getattr(ctx, "release_resume", None)
    if release is not None:
        release()


def attempt_columns(state: dict[str, Any]) -> dict[str, Any]:
    """Columns every metric row of this attempt carries (its first step, its start time), so a resumed run
    shows that it did not recompute the steps before its checkpoint."""
    return {"attempt/start_step": state["step"] + 1, "attempt/started_at": round(time.time(), 3)}


def save_and_report(ctx, engine, step: int, row: dict[str, Any], *, save: bool, logged: bool, state: dict[str, Any],
                    rows: list[dict], meta: dict[str, Any], rank: int,
                    save_extra: Callable[[Path], None] | None = None) -> None:
    """End of a step: with ``save`` a checkpoint (collective: every rank writes its part, then the context
    persists the folder) reported with the row; else the row alone when ``logged`` (a Ray Train report is
    a round trip to the controller: only logged steps pay for it)."""
    if save:
        with tempfile.TemporaryDirectory(prefix="tsrec-ckpt-") as d:
            save_checkpoint(engine, Path(d), state, rank, rows, meta=meta)
            if save_extra is not None:
                save_extra(Path(d))
            ctx.report(step, row, checkpoint_dir=Path(d))
    elif logged:
        ctx.report(step, row)


def export_model(engine, tok, zero_stage: int, rank: int, ctx, name: str) -> None:
    """:func:`export_hf` into a temporary folder, handed to ``ctx.save_artifact(name)`` (``best``,
    ``final``). Collective."""
    with tempfile.TemporaryDirectory(prefix=f"tsrec-{name}-") as d:
        export_hf(engine, tok, Path(d), zero_stage, rank)
        if rank == 0:
            ctx.save_artifact(Path(d), name)


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
