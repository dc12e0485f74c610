"""GRPO training loop on a DeepSpeed engine, rollouts inside the workers (METHOD.md 1.7, 3.2; R6, R7, R8).

One loop for a single process, a torchrun rank and a Ray Train ``TorchTrainer`` worker (the
:class:`tsrec.runtime.RunContext` it is given says where). A recipe over ``tsrec.train`` (process group
and device, DeepSpeed engine and LoRA, LR schedule, checkpoints and Hugging Face export, the valid
ranking probe), like SFT's; it imports no other recipe. Inputs: an SFT model folder, a data folder, a SID
folder and (for the semantic reward) the teacher file. Outputs through the context: checkpoints,
artifacts ``best/`` (best valid NDCG@10, starting with the SFT model itself, so RL can never export
a model worse on valid than its start: R7), ``final/`` and ``logs/`` (``metrics.csv``, TensorBoard,
``rl.png``).

    python -m torch.distributed.run --nproc_per_node 2 -m tsrec.rl.loop --config configs/demo.yaml

Per step (one rollout, ``rl.updates_per_rollout`` optimiser steps):

1. This rank's ``prompts_per_step / world`` prompts (a seeded permutation per epoch; the data position
   is the step number). A group is one prompt's G completions, generated and scored on one rank, so a
   group never straddles workers.
2. Rollouts: the constrained beam search (``tsrec.decode.rollout``; or constrained sampling with
   ``rl.rollout=sample``, seeded per step, rank and micro-batch) on the rank's own policy module,
   ``prompts_per_micro`` prompts at a time, G = ``rl.group_size`` distinct catalogue SIDs per prompt.
   Under ZeRO-3 the parameters are gathered for the rollout (the engine's hooks are lifted meanwhile,
   so the L+1 forwards of the search are plain forwards, not an all-gather per layer per step).
3. Rewards against each sample's own target SID ids (R8), group advantages, per-token semantic
   advantages (``rl.reward``), reference log-probs (frozen copy: a plain module under ZeRO 0/2, a
   second ZeRO-3 engine without optimizer under ZeRO-3), loss with the k3 KL, logits only at the
   completion positions (R6), ``engine.backward`` / ``engine.step`` per micro-batch (the optimiser
   steps once per update at the gradient-accumulation boundary).
4. Guards (R7), global over ranks so every rank stops together: completion length = SID length + 2,
   invalid SIDs, reward std (``DegenerateRolloutGuard``); share of groups containing the target and
   its mean rank are logged.
5. Every ``eval_every_steps``: valid HR/NDCG@{3,5,10} with the evaluation decoder (same prompts,
   beams and suffix scoring as ``tsrec eval`` with ``eval.split=valid``: ``tsrec.train.ranking``) on the
   fixed valid sample.
   The SFT start is evaluated the same way before step 0 and logged as metrics row ``step`` -1; the
   summary (:func:`valid_progress`) compares the best evaluation with it.
6. Reference sync every ``ref_sync_every_steps``: ``ref <- (1 - alpha) ref + alpha policy``.
7. Checkpoint like SFT (model, optimizer, scheduler, data position, RNG, guard state) plus the
   reference weights once they differ from the SFT start (before the first sync the reference is
   rebuilt from the model folder).
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsrec.config import Config, ConfigError, RlConfig
from tsrec.rl import core_algos as ca
from tsrec.rl.logs import plot_rl, progress_line, valid_progress
from tsrec.runtime import RunContext
from tsrec.train import checkpoint as ckpt
from tsrec.train.distributed import all_sum, init_distributed
from tsrec.train.engine import (EngineSpec, build_engine, deepspeed_config, load_causal_lm, prepare_for_training,
                                seed_everything)
from tsrec.train.faults import maybe_fail
from tsrec.train.metrics import save_logs
from tsrec.train.ranking import ValidRanking, gathered_policy, valid_ranking_rows
from tsrec.train.sampling import rank_share
from tsrec.train.schedule import lr_lambda

# `rl` keys that do not change what a step computes: log/save cadence, storage, fault tolerance, test hooks,
# how far to go.
NON_IDENTITY_KEYS = ("log_every_steps", "save_every_steps", "storage_path", "max_failures", "fail_at_step",
                     "fail_marker", "max_steps", "shared_prompt_forward")  # the last: same numbers, other speed
EVAL_KS = (3, 5, 10)
REF_DIR = "reference"


class RlLM(torch.nn.Module):
    """Wraps the policy so DeepSpeed's forward returns completion log-probs, LM head only at the
    completion positions (R6). ``lm`` is the attribute ``tsrec.train.checkpoint.export_hf`` exports.
    ``group_size`` > 1: rows are prompt-major groups and each prompt goes through the decoder once
    (``core_algos.grouped_sequence_logprobs``); 1: every row in full."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, sequences, attention_mask, completion_len: int, group_size: int = 1):
        return completion_logprobs(self.lm, sequences, attention_mask, completion_len, group_size)


def completion_logprobs(lm, sequences, attention_mask, completion_len: int, group_size: int) -> torch.Tensor:
    """Completion log-probs of rollout rows: each prompt once for its group (``group_size`` > 1) or every
    row in full (1)."""
    if group_size > 1:
        return ca.grouped_sequence_logprobs(lm, sequences, attention_mask, completion_len, group_size)
    return ca.sequence_logprobs(lm, sequences, attention_mask, completion_len)


def rl_identity(cfg: Config, inputs: dict[str, Path | None], world_size: int) -> str:
    """Identity of an RL run: ``tsrec.train.checkpoint.run_identity`` of the ``rl`` section, plus the
    evaluation settings its valid metrics (and so its best model) depend on."""
    full = cfg.to_dict()
    extra = {"eval": {"batch_size": full["eval"]["batch_size"], "score_suffix": full["eval"]["score_suffix"]}}
    if _embeds(cfg.rl):  # the similarity table comes from this encoder
        extra["embed"] = {k: full["embed"][k] for k in ("encoder", "max_length", "dtype")}
    return ckpt.run_identity(cfg, "rl", NON_IDENTITY_KEYS, inputs, world_size, extra)


def _embeds(rl: RlConfig) -> bool:
    return "semantic" in rl.reward and rl.semantic_similarity == "embedding"


def check_rl_config(cfg: Config, semantics_file: Path | None, world: int, n_train: int | None = None) -> None:
    """Every refusal that does not need the model: called by ``tsrec rl`` before any worker starts
    (``tsrec.orchestration.rl.run_rl``) and again at the start of :func:`train_rl` (torchrun, tests).

    Raises:
        ConfigError: sampling at temperature <= 0; ``updates_per_rollout`` < 1, or > 1 with ``clip_eps`` <= 0;
            a negative ``semantic_weight``; a semantic reward without the teacher file; the ``embedding``
            similarity without a loadable encoder folder (``embed.encoder``, else the packaged
            all-MiniLM-L6-v2); the batch sizes of :func:`rl_sizes` (``n_train`` None: not the prompt count).
    """
    from tsrec.pretrained import MissingWeightsError, default_encoder_path

    rl = cfg.rl
    if rl.rollout == "sample" and not rl.temperature > 0:
        raise ConfigError(f"rl.temperature must be > 0 for rl.rollout=sample, got {rl.temperature}")
    if rl.updates_per_rollout < 1:
        raise ConfigError(f"rl.updates_per_rollout={rl.updates_per_rollout}: at least one update per rollout")
    if rl.updates_per_rollout > 1 and not rl.clip_eps > 0:
        raise ConfigError(f"rl.updates_per_rollout={rl.updates_per_rollout} needs rl.clip_eps > 0, got {rl.clip_eps}")
    if rl.semantic_weight < 0:
        raise ConfigError(f"rl.semantic_weight must be >= 0, got {rl.semantic_weight}")
    if "semantic" in rl.reward and (semantics_file is None or not Path(semantics_file).exists()):
        raise ConfigError(f"rl.reward={rl.reward} needs the teacher file (--semantics, description_keywords.json), "
                          f"got {semantics_file}; or set rl.reward=ranking")
    if _embeds(rl):
        try:
            folder = Path(cfg.embed.encoder) if cfg.embed.encoder else default_encoder_path()
        except MissingWeightsError as e:
            raise ConfigError(f"rl.semantic_similarity=embedding: {e} (set embed.encoder to a local encoder folder, "
                              "or use rl.semantic_similarity=jaccard)") from e
        if not (folder / "config.json").exists():
            raise ConfigError(f"rl.semantic_similarity=embedding: {folder} is not a Hugging Face encoder folder (no "
                              "config.json); set embed.encoder, or use rl.semantic_similarity=jaccard")
    fake_n = rl.prompts_per_step if n_train is None else n_train
    rl_sizes(rl, fake_n, world)


def rl_sizes(rl: RlConfig, n_train: int, world: int) -> dict[str, int]:
    """Prompts per rank and micro-batches per step, steps per epoch, total steps, warm-up steps.

    Raises:
        ConfigError: ``prompts_per_step`` not a multiple of ``prompts_per_micro x workers``; fewer
            train prompts than one step; G < 2.
    """
    per_micro = rl.prompts_per_micro * world
    if rl.prompts_per_step < per_micro or rl.prompts_per_step % per_micro:
        raise ConfigError(f"rl.prompts_per_step={rl.prompts_per_step} is not a multiple of rl.prompts_per_micro x "
                          f"workers = {per_micro}")
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size={rl.group_size}: a group needs >= 2 completions (unbiased std)")
    if n_train < rl.prompts_per_step:
        raise ConfigError(f"{n_train} RL train prompts are fewer than rl.prompts_per_step={rl.prompts_per_step}")
    # Full steps only: the last partial batch of an epoch is dropped, so every step has the same shape.
    steps_per_epoch = n_train // rl.prompts_per_step
    total = rl.max_steps or math.ceil(rl.epochs * steps_per_epoch)
    return {"gas": rl.prompts_per_step // per_micro, "per_rank": rl.prompts_per_step // world,
            "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "warmup": math.ceil(rl.warmup_ratio * total * rl.updates_per_rollout)}


def train_rl(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
             ctx: RunContext) -> dict[str, Any]:
    """Run GRPO from an SFT model; returns a summary (steps, start/best/final valid metrics)."""
    from transformers import AutoTokenizer

    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import score_suffix_enabled, upstream_suffix_ids
    from tsrec.rl.data import build_rl_data, tokenize_rl
    from tsrec.sid.index import read_index

    rl = cfg.rl
    # --- 0. process group and device (the context's) ---
    dist = init_distributed(ctx)
    rank, world, device = dist.rank, dist.world_size, dist.device
    check_rl_config(cfg, semantics_file, world)

    # --- 1. data, constraints, rewards' tables ---
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.eos_token_id is None:
        raise ConfigError(f"{model_dir}: tokenizer has no EOS token (completions end with EOS; pad = EOS)")
    pad_id = tok.eos_token_id  # METHOD.md 1.7: left padding, pad = EOS
    data = build_rl_data(cfg, data_dir, sids_dir)
    train = tokenize_rl(tok, data.train)
    index = read_index(sids_dir)
    constraints = SidConstraints.from_index(index, tok, source=str(sids_dir)).to(device)
    L, G = constraints.num_levels, rl.group_size
    if G > constraints.num_sids:
        raise ConfigError(f"rl.group_size={G} exceeds the {constraints.num_sids} catalogue SIDs")
    suffix = upstream_suffix_ids(tok, constraints)  # "\n" + EOS: the completion the SFT model was trained on
    # Beam rollouts rank a group as the valid evaluation ranks its beams: with the suffix's log-probs in the
    # score when eval.score_suffix is on (upstream prompts: the default), else by the SID tokens only.
    score_suffix = score_suffix_enabled(cfg)
    C = L + len(suffix)
    # Each prompt through the decoder once per group in the update and the reference forward (a group's G
    # rows share it); gradient checkpointing turns the decoder's KV cache off, so it runs every row in full.
    shared = G if rl.shared_prompt_forward and not rl.gradient_checkpointing else 1
    sim, code_of = _semantic_tables(cfg, semantics_file, constraints, tok, device)
    valid = valid_ranking_rows(cfg, data_dir, index, tok, rl.valid_sample_size)
    probe = ValidRanking(cfg, valid, tok, constraints, rl.eval_beams, EVAL_KS, rl.zero_stage, rank, world)
    sizes = rl_sizes(rl, len(train), world)
    total_steps, steps_per_epoch = sizes["total_steps"], sizes["steps_per_epoch"]
    opt_steps = total_steps * rl.updates_per_rollout
    if rank == 0:
        print(f"[rl] prompts={len(train)} {data.counts} valid={len(valid)} world={world} G={G} "
              f"prompts/step={rl.prompts_per_step} micro={rl.prompts_per_micro} grad_accum={sizes['gas']} "
              f"steps/epoch={steps_per_epoch} steps={total_steps} reward={rl.reward} beta={rl.beta} "
              f"zero={rl.zero_stage} {rl.precision} device={device.type} shared_prompt_forward={shared > 1}", flush=True)

    inputs = {"model": model_dir, "data": data_dir, "sids": sids_dir,
              "semantics": semantics_file if "semantic" in rl.reward else None}
    meta = {"identity": rl_identity(cfg, inputs, world), "opt_steps": opt_steps}
    if ctx.resume_dir is not None:
        ckpt.check_meta(ctx.resume_dir, meta)

    # --- 2. policy engine and reference ---
    seed_everything(cfg.run.seed)
    # A micro-batch is prompts_per_micro groups of G completions.
    spec = EngineSpec.of("rl", rl, micro_batch_size=rl.prompts_per_micro * G, grad_accum=sizes["gas"])
    ds_config = deepspeed_config(spec, world, dist.on_gpu)
    lm = load_causal_lm(model_dir, spec.dtype, rl.attn_implementation, ds_config)
    lm = prepare_for_training(lm, rl.gradient_checkpointing, rl.lora, tok)
    engine = build_engine(RlLM(lm).train(), ds_config, lr_lambda(rl.scheduler, sizes["warmup"], opt_steps))
    ref = _build_reference(rl, lambda: load_causal_lm(model_dir, spec.dtype, rl.attn_implementation, ds_config),
                           ds_config, device)

    # --- 3. resume (the reference once it has left the SFT start) ---
    guard = ca.DegenerateRolloutGuard(C, rl.guard_equal_reward_steps, rl.max_invalid_sids)
    state: dict[str, Any] = {"step": -1, "best_ndcg": -1.0, "best_step": -1, "ref_syncs": 0, "equal_steps": 0,
                             "start_valid": None}
    rows = ckpt.resume(engine, ctx, rank, meta, state, "rl")
    if ctx.resume_dir is not None and state["ref_syncs"] > 0:
        _load_reference(ref, Path(ctx.resume_dir), rank, rl.zero_stage)
    guard.equal_steps = int(state["equal_steps"])
    ckpt.release_resume(ctx)
    attempt = ckpt.attempt_columns(state)

    # --- 4. the SFT start on valid: the first "best" (R7: RL never exports a worse-on-valid model) ---
    if state["start_valid"] is None and valid:
        start = _evaluate(probe, engine)
        state.update(start_valid=start, best_ndcg=start["ndcg@10"], best_step=-1)
        # The start is a metrics row like every later evaluation (step -1 = before the first RL step), so
        # metrics.csv, the plot and the summary compare RL against its own start measured the same way.
        rows.append({"step": -1, "epoch": 0.0, **{f"eval/{k}": v for k, v in start.items()}, **attempt})
        ckpt.export_model(engine, tok, rl.zero_stage, rank, ctx, "best")
        if rank == 0:
            print("[rl] SFT start on valid: " + " ".join(f"{k} {v:.4f}" for k, v in start.items()), flush=True)

    # --- 5. train: rollout, rewards and advantages, reference, update, guards, evaluation ---
    order_cache: dict[int, np.ndarray] = {}
    for step in range(state["step"] + 1, total_steps):
        t0 = time.perf_counter()
        share = rank_share(train, step, steps_per_epoch, rl.prompts_per_step, cfg.run.seed, rank, world, order_cache)
        batches, sums = rollout_and_score(engine, rl, share, pad_id, constraints, suffix, sim, code_of, tok.eos_token_id,
                                          (cfg.run.seed, step, rank), L, G, C, device, score_suffix)
        t_roll = time.perf_counter() - t0
        old_and_reference_logprobs(engine, ref, rl, batches, C, shared)
        loss_sums = update_policy(engine, rl, batches, C, shared)
        dt = time.perf_counter() - t0
        g = all_sum(torch.cat([sums, loss_sums]))
        stats = _global_stats(g, C)
        guard.check(step, stats)  # every rank sees the same global figures, so all stop together
        row = _step_row(step, steps_per_epoch, g, stats, engine.get_lr()[0], t_roll, dt, rl.updates_per_rollout, attempt)
        state["step"], state["equal_steps"] = step, guard.equal_steps
        # 5e. reference sync (TRL SyncRefModelCallback: every N optimiser steps)
        if ref is not None and rl.sync_ref and rl.ref_sync_every_steps > 0 and (step + 1) % rl.ref_sync_every_steps == 0:
            _sync_reference(ref, engine, rl)
            state["ref_syncs"] += 1
            row["train/ref_synced"] = 1
        # 5f. valid ranking metrics, best model
        last = step == total_steps - 1
        if valid and ((step + 1) % rl.eval_every_steps == 0 or last):
            val = _evaluate(probe, engine)
            row.update({f"eval/{k}": v for k, v in val.items()})
            if val["ndcg@10"] > state["best_ndcg"]:
                state.update(best_ndcg=val["ndcg@10"], best_step=step)
                ckpt.export_model(engine, tok, rl.zero_stage, rank, ctx, "best")
        logged = (step + 1) % rl.log_every_steps == 0 or "eval/ndcg@10" in row or last
        if logged:
            rows.append(row)
            if rank == 0:
                _print_progress(row, step, total_steps)
        # 5g. checkpoint (all ranks; the reference once synced), report
        save = (step + 1) % rl.save_every_steps == 0 or last
        save_ref = (lambda d: _save_reference(ref, d, rank, rl.zero_stage)) if state["ref_syncs"] > 0 else None
        ckpt.save_and_report(ctx, engine, step, row, save=save, logged=logged, state=state, rows=rows, meta=meta,
                             rank=rank, save_extra=save_ref)
        maybe_fail(rl.fail_at_step, rl.fail_marker, step, rank, world, "rl")

    # --- 6. final model and logs ---
    ckpt.export_model(engine, tok, rl.zero_stage, rank, ctx, "final")
    save_logs(ctx, rows, plot_rl, "rl.png", rank)
    summary = valid_progress(rows)
    if rank == 0 and summary["start_valid_ndcg@10"] is not None:
        print(f"[rl] {progress_line(summary)}", flush=True)
    evals = [r for r in rows if "eval/ndcg@10" in r and r["step"] >= 0]
    return {"steps": state["step"] + 1, "start_valid": state["start_valid"], "best_step": state["best_step"], **summary,
            "final_valid": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None,
            "prompts": len(train), "task_counts": data.counts, "dropped": data.dropped, "grad_accum": sizes["gas"],
            "steps_per_epoch": steps_per_epoch, "reward": rl.reward}


# ------------------------------------------------------------------------------------------------------
# The steps of an RL step
# ------------------------------------------------------------------------------------------------------


def rollout_and_score(engine, rl: RlConfig, share, pad_id, constraints, suffix, sim, code_of, eos_id,
                      draw_key: tuple[int, ...], L: int, G: int, C: int, device,
                      score_suffix: bool = False) -> tuple[list[dict], torch.Tensor]:
    """5a-b. Rollouts of this rank's prompts, ``prompts_per_micro`` at a time (no grad, policy in eval mode:
    no dropout in the search), then rewards and advantages per micro-batch. Returns the update batches and
    the rollout's sums for the global statistics (:func:`_global_stats`). ``score_suffix``: beam groups are
    ranked with the suffix's log-probs in the score (as the valid evaluation with ``eval.score_suffix``)."""
    from tsrec.decode.beam import left_pad

    micros = [share[i : i + rl.prompts_per_micro] for i in range(0, len(share), rl.prompts_per_micro)]
    engine.eval()
    batches, sums = [], torch.zeros(12, dtype=torch.float64)
    with gathered_policy(engine, rl.zero_stage) as policy:
        for m, mb in enumerate(micros):
            ids, mask = left_pad([s.prompt_ids for s in mb], pad_id, device)
            ro = _rollout(rl, policy, ids, mask, constraints, G, suffix, (*draw_key, m), score_suffix)
            batches.append(_score(rl, ro, mb, constraints, sim, code_of, eos_id, L, G, C, sums, device))
    return batches, sums


def old_and_reference_logprobs(engine, ref, rl: RlConfig, batches: list[dict], C: int, shared: int) -> None:
    """5c. The reference's log-probs (KL term, no grad) and the rollout policy's (PPO ratios, when a rollout
    feeds more than one update) of every batch; then the policy back in train mode."""
    for b in batches:
        with torch.no_grad():
            b["ref"] = _ref_logprobs(ref, rl.zero_stage, b, C, shared) if rl.beta > 0 else None
            b["old"] = engine(b["seq"], b["mask"], C, shared).float() if rl.updates_per_rollout > 1 else None
    engine.train()


def update_policy(engine, rl: RlConfig, batches: list[dict], C: int, shared: int) -> torch.Tensor:
    """5d. ``rl.updates_per_rollout`` optimiser steps over the batches (the engine steps at the accumulation
    boundary). Returns the sums (loss, KL, clip fraction, micro-batches) for the step's row."""
    loss_sums = torch.zeros(4, dtype=torch.float64)
    for _ in range(rl.updates_per_rollout):
        for b in batches:
            logp = engine(b["seq"], b["mask"], C, shared)
            loss, st = ca.policy_loss(logp.float(), b["adv"], b["cmask"], old_logprobs=b["old"], ref_logprobs=b["ref"],
                                      beta=rl.beta, clip_eps=rl.clip_eps if rl.updates_per_rollout > 1 else None)
            engine.backward(loss)
            engine.step()
            loss_sums += torch.tensor([loss.item(), st.kl, st.clip_fraction, 1.0], dtype=torch.float64)
    return loss_sums


def _evaluate(probe: ValidRanking, engine) -> dict[str, float]:
    """Valid HR/NDCG@{3,5,10} (the probe); ``ndcg@10`` is the best-model criterion, so it is always there
    (the largest cut-off's when the beams are fewer than 10)."""
    out = probe(engine)
    out.setdefault("ndcg@10", out[f"ndcg@{probe.ks[-1]}"])
    return out


def _step_row(step: int, steps_per_epoch: int, g: torch.Tensor, stats: dict[str, float], lr: float, t_roll: float,
              dt: float, updates: int, attempt: dict[str, Any]) -> dict[str, Any]:
    """The metrics row of a step from the all-reduced sums (rollout sums, then :func:`update_policy`'s)."""
    n_micro = max(g[15].item(), 1.0)
    return {
        "step": step, "epoch": step / steps_per_epoch,
        "train/loss": g[12].item() / n_micro, "train/kl": g[13].item() / n_micro,
        "train/clip_frac": g[14].item() / n_micro,
        "rollout/reward_mean": stats["reward_mean"], "rollout/reward_std": stats["reward_std"],
        "rollout/rank_reward_mean": stats["rank_reward_mean"], "rollout/semantic_mean": stats["semantic_mean"],
        "rollout/hit_share": stats["hit_share"], "rollout/target_rank": stats["target_rank"],
        "rollout/completion_len": stats["completion_len_max"], "rollout/invalid_sids": stats["invalid_sids"],
        "train/lr": lr, "time/rollout_s": t_roll, "time/update_s": dt - t_roll, "time/step_s": dt,
        "train/tokens_per_s": g[11].item() * updates / dt,
        "rollout/prompts_per_s": g[10].item() / max(t_roll, 1e-9), **attempt,
    }


def _print_progress(row: dict[str, Any], step: int, total_steps: int) -> None:
    print(f"[rl] step {step + 1}/{total_steps} loss {row['train/loss']:.4f} reward {row['rollout/reward_mean']:.4f}"
          f"±{row['rollout/reward_std']:.4f} hit {row['rollout/hit_share']:.3f} kl {row['train/kl']:.5f} "
          f"rollout {row['time/rollout_s']:.2f}s update {row['time/update_s']:.2f}s"
          + (f" valid ndcg@10 {row['eval/ndcg@10']:.4f}" if "eval/ndcg@10" in row else ""), flush=True)


def _rollout(rl: RlConfig, policy, ids, mask, constraints, G, suffix, draw_key: tuple[int, ...],
             score_suffix: bool = False):
    """Beam rollouts (ranked with the suffix scored when ``score_suffix``), or constrained samples from a
    generator seeded by ``draw_key`` (seed, step, rank, micro-batch): a resumed or repeated step draws the
    same completions, whatever ran before it. Samples are ranked by their SID tokens' score (the suffix is
    forced after every SID; its log-probs would only reorder the draws)."""
    from tsrec.decode.rollout import generate_rollouts, sample_rollouts

    if rl.rollout == "beam":
        return generate_rollouts(policy, ids, mask, constraints, G, suffix_ids=suffix, score_suffix=score_suffix)
    gen = torch.Generator(device=ids.device)
    gen.manual_seed(int.from_bytes(hashlib.sha256(repr(draw_key).encode()).digest()[:8], "little") & (2**63 - 1))
    return sample_rollouts(policy, ids, mask, constraints, G, rl.temperature, gen, suffix_ids=suffix)


def _score(rl: RlConfig, ro, mb, constraints, sim, code_of, eos_id, L, G, C, sums, device) -> dict[str, Any]:
    """Rewards and advantages of one micro-batch of rollouts; adds its figures to ``sums`` (see _global_stats)."""
    B = len(mb)
    comp = ro.completion_ids[:, :L].reshape(B, G, L)
    target = torch.tensor([s.target_ids for s in mb], dtype=torch.long, device=device)
    hits = ca.sid_hits(comp, target)  # each sample's OWN target (R8)
    ranking = ca.ranking_rewards(hits, ro.beam_ranks.reshape(B, G), rl.rule_weight, rl.rank_weight)
    seq_adv = ca.group_advantages(ranking.total, rl.adv_eps)
    tok_adv, sem = None, torch.zeros((B, G), device=device)
    if sim is not None:
        tok_rewards = ca.semantic_token_rewards(sim, code_of[comp], code_of[target])
        tok_adv = ca.semantic_advantages(tok_rewards, rl.adv_eps)
        sem = tok_rewards.mean(-1)
    adv = ca.combine_advantages(rl.reward, seq_adv, tok_adv, C, rl.semantic_weight)
    # The reward the run trains on (the guard watches its spread): ranking, semantic, or their sum.
    reward = {"ranking": ranking.total, "semantic": sem,
              "ranking+semantic": ranking.total + rl.semantic_weight * sem}[rl.reward]
    cmask = ca.completion_mask(ro.completion_ids, eos_id)
    lengths = cmask.sum(1)
    valid_leaf = constraints.leaf_matches(comp, ro.sid_index.reshape(B, G)) & (ro.sid_index.reshape(B, G) >= 0)
    group_hit = hits.any(1)
    hit_rank = hits.float().argmax(1).float()
    r = reward.double()
    sums += torch.tensor([
        r.sum().item(), (r * r).sum().item(), r.numel(),
        ranking.total.double().sum().item(), sem.double().sum().item(),
        group_hit.double().sum().item(), hit_rank[group_hit].double().sum().item(),
        float((lengths != C).sum()), float((~valid_leaf).sum()), float(lengths.max()),
        float(B), float(ro.attention_mask.sum()),
    ], dtype=torch.float64)
    return {"seq": ro.sequences, "mask": ro.attention_mask, "adv": adv, "cmask": cmask}


def _global_stats(g: torch.Tensor, C: int) -> dict[str, float]:
    """Global per-step figures from the all-reduced sums (:func:`_score` adds them; the keys the guard reads)."""
    n, groups = max(g[2].item(), 1.0), max(g[10].item(), 1.0)
    var = (g[1].item() - g[0].item() ** 2 / n) / max(n - 1, 1.0)
    hit_groups = g[5].item()
    bad_len = g[7].item()
    return {
        "reward_mean": g[0].item() / n, "reward_std": math.sqrt(max(var, 0.0)) if var > 1e-18 else 0.0,
        "rank_reward_mean": g[3].item() / n, "semantic_mean": g[4].item() / n,
        "hit_share": hit_groups / groups, "target_rank": g[6].item() / hit_groups if hit_groups else math.nan,
        # any completion whose counted length differs from C fails the guard's length check
        "completion_len_min": float(C) if bad_len == 0 else -1.0,
        "completion_len_max": float(C) if bad_len == 0 else g[9].item(),
        "invalid_sids": g[8].item(),
    }


def _semantic_tables(cfg: Config, semantics_file, constraints, tok, device):
    """Token-similarity tables and the vocabulary-id -> code lookup, for the semantic rewards (else None).
    ``embedding``: the teacher descriptions are embedded once here, at the start of the run, by the item-text
    encoder of the SID stage (``tsrec.embed.TextEncoder`` with the ``embed`` section; on this rank's CPU)."""
    rl = cfg.rl
    if "semantic" not in rl.reward:
        return None, None
    from tsrec.semantics.records import read_teacher_file

    code_of = ca.sid_code_lookup(tok.get_vocab(), len(tok)).to(device)
    num_codes = [int(code_of[ids].max()) + 1 for ids in constraints.level_token_ids]
    records = read_teacher_file(semantics_file)
    embed_fn = None
    if rl.semantic_similarity == "embedding":
        from tsrec.embed import TextEncoder, encoder_kwargs

        encoder = TextEncoder(**{**encoder_kwargs(cfg.embed), "device": "cpu"})
        embed_fn = lambda texts: torch.from_numpy(encoder.encode(texts))  # noqa: E731
    sim = ca.build_token_similarity(records, num_codes, method=rl.semantic_similarity, embed_fn=embed_fn).to(device)
    return sim, code_of


def _build_reference(rl: RlConfig, load_lm, ds_config, device):
    """Frozen copy of the start model: a plain eval module (ZeRO 0/2), a ZeRO-3 engine without optimizer (3)."""
    if rl.beta <= 0:
        return None  # no KL term: no reference forward
    lm = load_lm().eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    if rl.zero_stage != 3:
        return lm.to(device)
    # ZeRO-3: wrapped like the policy, so the engine's root forward (and its hook bookkeeping) runs.
    ref = RlLM(lm).eval()
    import deepspeed

    conf = {k: ds_config[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                      "train_batch_size", "bf16", "zero_optimization")}
    conf["zero_optimization"] = {k: v for k, v in conf["zero_optimization"].items() if k != "offload_optimizer"}
    engine, *_ = deepspeed.initialize(model=ref, config=conf)
    engine.eval()
    return engine


def _ref_logprobs(ref, zero_stage: int, b, C: int, group_size: int) -> torch.Tensor:
    # ZeRO-3: through the engine's module (its hooks gather each layer; every rank runs the same forwards).
    if zero_stage == 3:
        return ref(b["seq"], b["mask"], C, group_size).float()
    return completion_logprobs(ref, b["seq"], b["mask"], C, group_size).float()


@torch.no_grad()
def _sync_reference(ref, engine, rl: RlConfig) -> None:
    """``ref <- (1 - alpha) ref + alpha policy``. ZeRO-3: on the local partitions (same shapes and world
    size, so partition i of the reference lines up with partition i of the policy)."""
    if rl.zero_stage == 3:
        ca.mix_into_reference_([p.ds_tensor for p in ref.module.parameters()],
                               [p.ds_tensor for p in engine.module.parameters()], rl.ref_sync_alpha)
        _regather_from_partitions(ref.module.parameters())
        return
    pol_lm = engine.module.lm
    if hasattr(pol_lm, "get_base_model"):  # LoRA: the merged weights, matched by name
        pol_sd = ckpt.merged_state_dict(pol_lm)
        ref_sd = dict(ref.named_parameters())
        names = [k for k in ref_sd if k in pol_sd]
        ca.mix_into_reference_([ref_sd[k] for k in names], [pol_sd[k] for k in names], rl.ref_sync_alpha)
        return
    ca.mix_into_reference_(list(ref.parameters()), list(pol_lm.parameters()), rl.ref_sync_alpha)


def _regather_from_partitions(params) -> None:
    """After writing ZeRO-3 partitions (``ds_tensor``) directly: release every parameter that is currently
    gathered, so that its next use gathers the new partitions. DeepSpeed keeps small parameters
    (``stage3_param_persistence_threshold``: norms, biases, a whole tiny model) gathered for good, and a
    forward reads those from ``param.data``, never from the partition that was just written."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in params if p.ds_status == ZeroParamStatus.AVAILABLE]
    if gathered:
        gathered[0].partition(param_list=gathered, has_been_updated=False)


def _save_reference(ref, d: Path, rank: int, zero_stage: int) -> None:
    (d / REF_DIR).mkdir(parents=True, exist_ok=True)
    if zero_stage == 3:  # each rank its own partitions
        torch.save([p.ds_tensor.detach().cpu() for p in ref.module.parameters()], d / REF_DIR / f"rank_{rank}.pt")
    elif rank == 0:
        torch.save({k: v.detach().cpu() for k, v in ref.state_dict().items()}, d / REF_DIR / "weights.pt")


@torch.no_grad()
def _load_reference(ref, d: Path, rank: int, zero_stage: int) -> None:
    if zero_stage == 3:
        parts = torch.load(d / REF_DIR / f"rank_{rank}.pt")
        for p, saved in zip(ref.module.parameters(), parts):
            p.ds_tensor.copy_(saved)
        _regather_from_partitions(ref.module.parameters())
        return
    ref.load_state_dict(torch.load(d / REF_DIR / "weights.pt"))


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: ``python -m torch.distributed.run --nproc_per_node N -m tsrec.rl.loop --config F``."""
    from tsrec.train.launch import torchrun_main

    return torchrun_main(train_rl, "tsrec.rl.loop", "sft/model", "rl", argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
