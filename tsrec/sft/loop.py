"""SFT training loop on a DeepSpeed engine (METHOD.md 1.6, 3.1; requirements R5, R6).

One loop for a single process, a torchrun rank and a Ray Train ``TorchTrainer`` worker: where it runs
is the :class:`tsrec.runtime.RunContext` it is given. Inputs: a model folder (``tsrec model init``:
backbone + SID tokens), a data folder, a SID folder and the teacher file (TS-Align). Outputs through
the context: checkpoints (``tsrec.train.checkpoint``), artifacts ``best/`` and ``final/`` (Hugging Face
folders with the tokenizer) and ``logs/`` (``metrics.csv``, TensorBoard events, ``loss.png``).

    python -m torch.distributed.run --nproc_per_node 2 -m tsrec.sft.loop --config configs/sft_demo.yaml

Per optimiser step: the step's ``global_batch_size`` samples (a fixed, seeded order per epoch, so the
data position is the step number) are split across ranks, packed (or padded) into exactly
``gradient_accumulation_steps`` micro-batches per rank, and the loss is the weighted token mean over the
whole step (``packing.py``). Validation loss every ``eval_every_steps``, early stopping with patience,
best model kept.

Differs from MiniOneRec: DeepSpeed ZeRO instead of DDP; packing; logits only at supervised positions;
per-task loss weights and shares; exact resume (optimizer, scheduler, data position, RNG).

The recipe stands on ``tsrec.train`` (process group and device, engine, LR schedule, checkpoints and
export, the valid ranking probe); it imports no other recipe.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsrec.config import Config, ConfigError, SftConfig
from tsrec.runtime import RunContext
from tsrec.sft.flops import flop_model, peak_flops
from tsrec.sft.logs import plot_losses
from tsrec.sft.packing import forward_hidden, micro_batches, weighted_token_loss
from tsrec.sft.tasks import TASK_NAMES, build_mixture, tokenize_samples
from tsrec.train import checkpoint as ckpt
from tsrec.train.distributed import all_sum, init_distributed
from tsrec.train.engine import (EngineSpec, build_engine, deepspeed_config, load_causal_lm, prepare_for_training,
                                seed_everything, sid_token_ids)
from tsrec.train.faults import maybe_fail
from tsrec.train.metrics import save_logs
from tsrec.train.ranking import ValidRanking, ranking_metric_names, valid_ranking_rows
from tsrec.train.sampling import planned_counts, rank_share
from tsrec.train.schedule import lr_lambda

# `sft` keys that do not change what a training step computes: log/save cadence, where checkpoints
# go, fault tolerance and the test hook. `max_steps` only says how far to go, so a run extended to
# more steps resumes; its one effect on the computation, the LR horizon, is checked via the meta.
NON_IDENTITY_KEYS = ("log_every_steps", "save_every_steps", "storage_path", "max_failures", "fail_at_step",
                     "fail_marker", "max_steps")


class SftLM(torch.nn.Module):
    """Wraps a causal LM so DeepSpeed's forward is the SFT loss: hidden states, then the LM head only
    at supervised positions (R6). ``lm`` is the attribute ``tsrec.train.checkpoint.export_hf`` exports."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        hidden = forward_hidden(self.lm, batch)
        return weighted_token_loss(hidden, self.lm.get_output_embeddings(), batch)


def sft_identity(cfg: Config, inputs: dict[str, Path | None], world_size: int) -> str:
    """Identity of an SFT run (``tsrec.train.checkpoint.run_identity`` of the ``sft`` section): the same
    identity resumes, any other starts fresh."""
    return ckpt.run_identity(cfg, "sft", NON_IDENTITY_KEYS, inputs, world_size)


def gradient_accumulation(cfg: SftConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"sft.global_batch_size={cfg.global_batch_size} is not a multiple of "
                          f"sft.micro_batch_size x workers = {per_step}")
    return cfg.global_batch_size // per_step


def engine_spec(cfg: SftConfig, world_size: int) -> EngineSpec:
    """The ``sft`` section as the engine sees it: micro-batches of ``micro_batch_size`` samples."""
    return EngineSpec.of("sft", cfg, cfg.micro_batch_size, gradient_accumulation(cfg, world_size))


def train_sft(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
              ctx: RunContext) -> dict[str, Any]:
    """Run SFT; returns a summary (steps, best/final validation loss, derived sizes)."""
    sft = cfg.sft
    # --- 0. process group and device (the context's) ---
    dist = init_distributed(ctx)
    rank, world = dist.rank, dist.world_size
    from transformers import AutoTokenizer

    # --- 1. data: mixture, tokenised, validation ---
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mix = build_mixture(cfg, data_dir, sids_dir, semantics_file if sft.use_ts_align else None)
    train = tokenize_samples(tok, mix.train, sft.cutoff_len, sft)
    valid = tokenize_samples(tok, mix.valid, sft.cutoff_len, sft)
    for s in valid:
        s.loss_weight = 1.0  # validation loss is the plain token mean

    # --- 2. derived sizes (printed once) ---
    spec = engine_spec(sft, world)
    gas = spec.grad_accum
    pack_len = sft.pack_len or sft.cutoff_len
    steps_per_epoch = math.ceil(len(train) / sft.global_batch_size)
    total_steps = sft.max_steps or math.ceil(sft.epochs * steps_per_epoch)
    # LR decays to 0 over `epochs` (as the public run: early stopping ends before); a longer max_steps
    # stretches the horizon so the LR never sits at 0.
    decay_steps = max(math.ceil(sft.epochs * steps_per_epoch), total_steps)
    if rank == 0:
        print(f"[sft] samples={len(train)} {mix.counts} valid={len(valid)} world={world} micro={sft.micro_batch_size} "
              f"grad_accum={gas} global_batch={sft.global_batch_size} steps/epoch={steps_per_epoch} "
              f"steps={total_steps} decay_steps={decay_steps} packing={sft.packing} pack_len={pack_len} zero={sft.zero_stage} "
              f"{sft.precision} device={dist.device.type}", flush=True)
    planned = planned_counts(train, total_steps, steps_per_epoch, sft.global_batch_size, cfg.run.seed)
    unseen = [t for t, n in mix.counts.items() if n and not planned.get(t) and getattr(sft.tasks, t).loss_weight]
    if rank == 0:
        print(f"[sft] samples drawn in the {total_steps} planned steps: {planned}"
              + (f"; WARNING: none of {unseen}: their settings cannot change this run" if unseen else ""), flush=True)

    # A checkpoint is resumed only by the same run (config, inputs, world size, LR horizon): checked
    # before any model is built, so a changed config fails fast instead of continuing old weights.
    meta = {"identity": sft_identity(cfg, {"model": model_dir, "data": data_dir, "sids": sids_dir,
                                           "semantics": semantics_file if sft.use_ts_align else None}, world),
            "decay_steps": decay_steps}
    if ctx.resume_dir is not None:
        ckpt.check_meta(ctx.resume_dir, meta)

    # --- 3. model, LoRA, engine (the engine before resume: DeepSpeed owns the param groups) ---
    seed_everything(cfg.run.seed)
    ds_config = deepspeed_config(spec, world, dist.on_gpu)
    lm = load_causal_lm(model_dir, spec.dtype, sft.attn_implementation, ds_config)
    lm = prepare_for_training(lm, sft.gradient_checkpointing, sft.lora, tok)
    # MFU counts model FLOPs as trained (tsrec/sft/flops.py): under LoRA only the SID rows of the head
    # get a weight gradient, and frozen weights none.
    flops = flop_model(lm, head_trainable_rows=len(sid_token_ids(tok)) if sft.lora.enabled else None)
    engine = build_engine(SftLM(lm).train(), ds_config, lr_lambda("linear", sft.warmup_steps, decay_steps))
    ranking = _valid_ranking(cfg, data_dir, sids_dir, tok, dist)
    _check_best_metric(sft, ranking)

    # --- 4. resume ---
    state = {"step": -1, "best_val": float("inf"), "bad_evals": 0, "stopped": False}
    rows = ckpt.resume(engine, ctx, rank, meta, state, "sft")
    ckpt.release_resume(ctx)
    attempt = ckpt.attempt_columns(state)

    # --- 5. train ---
    order_cache: dict[int, np.ndarray] = {}
    for step in range(state["step"] + 1, total_steps):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        share = rank_share(train, step, steps_per_epoch, sft.global_batch_size, cfg.run.seed, rank, world, order_cache)
        batches = micro_batches(share, gas, sft.packing, pack_len, sft.micro_batch_size, pad_id)
        counts, weight_total = _train_step(engine, batches, gas, world, flops)
        dt = time.perf_counter() - t0
        row = _step_row(step, steps_per_epoch, counts, weight_total, engine.get_lr()[0], dt, attempt)
        if dist.on_gpu:
            k = len(TASK_NAMES)
            row["train/mfu"] = counts[3 + 2 * k].item() / dt / (peak_flops() * world)

        # --- 6. validation, early stopping, best model ---
        last = step == total_steps - 1
        if valid and ((step + 1) % sft.eval_every_steps == 0 or last):
            row["eval/loss"] = _validate(engine, valid, sft.micro_batch_size, pad_id, rank, world)
            if ranking is not None:
                row.update({f"eval/{k}": v for k, v in ranking(engine).items()})
            # state["best_val"] is the best score so far, lower is better: valid loss, or a ranking metric negated.
            score = row["eval/loss"] if sft.best_metric == "loss" else -row[f"eval/{sft.best_metric}"]
            if score < state["best_val"]:
                state.update(best_val=score, bad_evals=0)
                ckpt.export_model(engine, tok, sft.zero_stage, rank, ctx, "best")
            else:
                state["bad_evals"] += 1
                if sft.early_stopping_patience > 0 and state["bad_evals"] >= sft.early_stopping_patience:
                    state["stopped"] = True
                    if rank == 0:
                        print(f"[sft] early stop at step {step}: no improvement in {state['bad_evals']} evals", flush=True)
        state["step"] = step
        logged = (step + 1) % sft.log_every_steps == 0 or "eval/loss" in row or last
        if logged:
            rows.append(row)
            if rank == 0:
                _print_progress(row, step, total_steps)

        # --- 7. checkpoint (all ranks), report ---
        save = (step + 1) % sft.save_every_steps == 0 or last or state["stopped"]
        ckpt.save_and_report(ctx, engine, step, row, save=save, logged=logged, state=state, rows=rows, meta=meta,
                             rank=rank)
        maybe_fail(sft.fail_at_step, sft.fail_marker, step, rank, world, "sft")

    # --- 8. final model and logs ---
    ckpt.export_model(engine, tok, sft.zero_stage, rank, ctx, "final")
    save_logs(ctx, rows, plot_losses, "loss.png", rank)
    final = [r for r in rows if "eval/loss" in r]
    return {"steps": state["step"] + 1, "best_val_loss": min((r["eval/loss"] for r in final), default=float("inf")),
            "final_val_loss": final[-1]["eval/loss"] if final else None,
            "final_train_loss": rows[-1]["train/loss"] if rows else None, "early_stopped": state["stopped"],
            "grad_accum": gas, "steps_per_epoch": steps_per_epoch, "samples": len(train), "task_counts": mix.counts,
            "planned_task_counts": planned,
            "first_val_loss": final[0]["eval/loss"] if final else None}


def _train_step(engine, batches, gas: int, world: int, flops) -> tuple[torch.Tensor, float]:
    """Forward/backward every micro-batch of one optimiser step (the engine steps at the accumulation
    boundary); returns the step's global sums (loss, per-task loss and token counts, real/total tokens,
    model FLOPs) and the global loss-weight total."""
    weight_total = all_sum(torch.tensor([sum(b.weight_sum for b in batches)], dtype=torch.float64))[0].item()
    scale = gas * world / max(weight_total, 1e-12)  # engine.backward divides by gas, DP averages over ranks
    loss_sum = torch.zeros(1, dtype=torch.float64)
    task_sum = torch.zeros(len(TASK_NAMES), dtype=torch.float64)
    task_cnt = torch.zeros(len(TASK_NAMES), dtype=torch.float64)
    for b in batches:
        total, ts, tc = engine(_to(b, engine.device))
        engine.backward(total * scale)
        engine.step()
        loss_sum += total.detach().double().cpu()
        task_sum += ts.double().cpu()
        task_cnt += tc.double().cpu()
    tokens = torch.tensor([sum(b.real_tokens for b in batches), sum(b.total_tokens for b in batches),
                           sum(flops.step_flops(b.real_tokens, int((b.targets != -100).sum()), b.sample_lengths)
                               for b in batches)], dtype=torch.float64)
    return all_sum(torch.cat([loss_sum, task_sum, task_cnt, tokens])), weight_total


def _step_row(step: int, steps_per_epoch: int, counts: torch.Tensor, weight_total: float, lr: float, dt: float,
              attempt: dict[str, Any]) -> dict[str, Any]:
    """The metrics row of a step from its global sums (layout of :func:`_train_step`)."""
    k = len(TASK_NAMES)
    real, total_tok = counts[1 + 2 * k].item(), counts[2 + 2 * k].item()
    row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch,
                           "train/loss": counts[0].item() / max(weight_total, 1e-12),
                           "train/lr": lr, "train/tokens_per_s": real / dt,
                           "train/padding_frac": 1 - real / max(total_tok, 1), "train/step_s": dt, **attempt}
    for i, name in enumerate(TASK_NAMES):
        if counts[1 + k + i] > 0:
            row[f"train/loss/{name}"] = (counts[1 + i] / counts[1 + k + i]).item()
    return row


def _print_progress(row: dict[str, Any], step: int, total_steps: int) -> None:
    """One short progress line; every column of the row is in metrics.csv / TensorBoard."""
    tasks = " ".join(f"{k.rsplit('/', 1)[1]} {v:.3f}" for k, v in row.items() if k.startswith("train/loss/"))
    print(f"[sft] step {step + 1}/{total_steps} loss {row['train/loss']:.4f} ({tasks})"
          + (f" valid {row['eval/loss']:.4f}" if "eval/loss" in row else "")
          + f" {row['train/tokens_per_s']:.0f} tok/s", flush=True)


def _valid_ranking(cfg: Config, data_dir: Path, sids_dir: Path, tok, dist) -> ValidRanking | None:
    """The valid ranking probe when ``sft.valid_ranking_sample`` > 0 (sweeps: valid HR/NDCG@K), else None."""
    sft = cfg.sft
    if sft.valid_ranking_sample <= 0:
        return None
    from tsrec.decode.constraints import SidConstraints
    from tsrec.sid.index import read_index

    index = read_index(sids_dir)
    constraints = SidConstraints.from_index(index, tok, source=str(sids_dir)).to(dist.device)
    rows = valid_ranking_rows(cfg, data_dir, index, tok, sft.valid_ranking_sample)
    return ValidRanking(cfg, rows, tok, constraints, sft.valid_ranking_beams, zero_stage=sft.zero_stage,
                        rank=dist.rank, world=dist.world_size)


def _check_best_metric(sft: SftConfig, ranking) -> None:
    """ConfigError unless ``sft.best_metric`` is "loss" or a metric the valid ranking probe reports."""
    if sft.best_metric == "loss":
        return
    known = ranking_metric_names(ranking.ks) if ranking is not None else []
    if sft.best_metric not in known:
        raise ConfigError(f"sft.best_metric={sft.best_metric!r}: expected 'loss' or one of the valid ranking metrics "
                          f"{known or '(none: sft.valid_ranking_sample is 0)'}")


def _validate(engine, valid, micro, pad_id, rank, world) -> float:
    """Token-mean CE of next-SID on the valid split, sharded over ranks (same number of forwards per rank)."""
    engine.eval()
    n_micro = math.ceil(math.ceil(len(valid) / world) / micro)
    share = list(np.array_split(np.arange(len(valid)), world)[rank])
    batches = micro_batches([valid[i] for i in share], n_micro, False, 0, micro, pad_id)
    acc = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for b in batches:
            total, _, _ = engine(_to(b, engine.device))
            acc += torch.tensor([total.item(), b.weight_sum], dtype=torch.float64)
    engine.train()
    acc = all_sum(acc)
    return (acc[0] / acc[1].clamp(min=1)).item()


def _to(batch, device):
    import dataclasses

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: ``python -m torch.distributed.run --nproc_per_node N -m tsrec.sft.loop --config F``."""
    from tsrec.train.launch import torchrun_main

    return torchrun_main(train_sft, "tsrec.sft.loop", "model", "sft", argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
