"""GRPO training loop on a DeepSpeed engine, rollouts inside the workers (METHOD.md 1.7, 3.2; R6, R7, R8).

One loop for a single process, a torchrun rank and a Ray Train ``TorchTrainer`` worker (the
:class:`tsrec.runtime.RunContext` it is given says where). It reuses the SFT machinery: the DeepSpeed
dict (``tsrec.sft.loop.deepspeed_config``), the process-group set-up, checkpoints and Hugging Face
export (``tsrec.sft.checkpoint``) and the log writers. Inputs: an SFT model folder, a data folder, a SID
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
   beams and suffix scoring as ``tsrec eval`` with ``eval.split=valid``) on the fixed valid sample.
   The SFT start is evaluated the same way before step 0 and logged as metrics row ``step`` -1; the
   summary (:func:`valid_progress`) compares the best evaluation with it.
6. Reference sync every ``ref_sync_every_steps``: ``ref <- (1 - alpha) ref + alpha policy``.
7. Checkpoint like SFT (model, optimizer, scheduler, data position, RNG, guard state) plus the
   reference weights once they differ from the SFT start (before the first sync the reference is
   rebuilt from the model folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from tsrec import prompts
from tsrec.config import Config, ConfigError, RlConfig
from tsrec.rl import core_algos as ca
from tsrec.runtime import RunContext
from tsrec.sft import checkpoint as ckpt

# `rl` keys that do not change what a step computes (as tsrec.sft.checkpoint.NON_IDENTITY_KEYS).
NON_IDENTITY_KEYS = ("log_every_steps", "save_every_steps", "storage_path", "max_failures", "fail_at_step",
                     "fail_marker", "max_steps", "shared_prompt_forward")  # the last: same numbers, other speed
EVAL_KS = (3, 5, 10)
REF_DIR = "reference"


class RlLM(torch.nn.Module):
    """Wraps the policy so DeepSpeed's forward returns completion log-probs, LM head only at the
    completion positions (R6). ``lm`` is the attribute ``tsrec.sft.checkpoint.export_hf`` exports.
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
    """Identity of an RL run: the ``rl`` section (minus :data:`NON_IDENTITY_KEYS`), ``prompts``, the seed,
    the world size and input fingerprints (as ``tsrec.sft.checkpoint.run_identity`` does for ``sft``)."""
    from tsrec.artifacts import describe_input

    full = cfg.to_dict()
    rl = {k: v for k, v in full["rl"].items() if k not in NON_IDENTITY_KEYS}
    prints = {k: ({x: y for x, y in describe_input(v).items() if x != "path"} if v is not None else None)
              for k, v in sorted(inputs.items())}
    payload = {"rl": rl, "prompts": full["prompts"], "seed": full["run"]["seed"], "world_size": world_size,
               "eval": {"batch_size": full["eval"]["batch_size"], "score_suffix": full["eval"]["score_suffix"]},
               "inputs": prints}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def lr_lambda(kind: str, warmup: int, total: int):
    """Linear warm-up from 0, then cosine / linear decay to 0 at ``total`` optimiser steps, or constant."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return f


def _ds_view(rl: RlConfig, completions_per_micro: int, completions_per_step: int) -> SimpleNamespace:
    """The ``sft``-shaped view of ``rl`` that ``tsrec.sft.loop.deepspeed_config`` reads (one mapping to DeepSpeed)."""
    return SimpleNamespace(micro_batch_size=completions_per_micro, global_batch_size=completions_per_step,
                           zero_stage=rl.zero_stage, offload_optimizer=rl.offload_optimizer,
                           offload_params=rl.offload_params, lora=rl.lora, lr=rl.lr, weight_decay=rl.weight_decay,
                           precision=rl.precision, grad_clip=rl.grad_clip)


@contextlib.contextmanager
def gathered_policy(engine, zero_stage: int):
    """The policy's HF module with full parameters for local forwards (rollouts, evaluation).

    ZeRO 0/2: every rank holds every weight; the module is used as is. ZeRO-3: the partitions are
    gathered (``GatheredParameters``, read-only) and the engine's per-module fetch/release hooks are
    removed meanwhile, then registered again (the coordinator re-records its trace on the next forward).
    """
    lm = engine.module.lm
    if zero_stage != 3:
        yield lm
        return
    import deepspeed

    offload = getattr(engine.optimizer, "parameter_offload", engine.optimizer)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for p in engine.module.parameters():
            p.ds_active_sub_modules.clear()
        for h in offload.forward_hooks + offload.backward_hooks:
            h.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield lm
        finally:
            offload._register_deepspeed_module(offload.module)


def train_rl(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
             ctx: RunContext) -> dict[str, Any]:
    """Run GRPO from an SFT model; returns a summary (steps, start/best/final valid metrics)."""
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import upstream_suffix_ids
    from tsrec.rl.data import build_rl_data, tokenize_rl
    from tsrec.sft.loop import apply_lora, deepspeed_config, ensure_dist_env, maybe_fail, rank_share
    from tsrec.sid.index import read_index

    rl = cfg.rl
    rank, world = ctx.rank, ctx.world_size
    on_gpu = torch.cuda.is_available()
    if rl.rollout == "sample" and not rl.temperature > 0:
        raise ConfigError(f"rl.temperature must be > 0 for rl.rollout=sample, got {rl.temperature}")
    # --- 0. process group ---
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not on_gpu:  # skip the shm-op JIT build on CPU (STACK.md 2), as SFT does
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if on_gpu:
        torch.cuda.set_device(torch.device(ctx.device))
    ensure_dist_env()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device(ctx.device)

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
    C = L + len(suffix)
    # Each prompt through the decoder once per group in the update and the reference forward (a group's G
    # rows share it); gradient checkpointing turns the decoder's KV cache off, so it runs every row in full.
    shared = G if rl.shared_prompt_forward and not rl.gradient_checkpointing else 1
    sim, code_of = _semantic_tables(rl, semantics_file, constraints, tok, device)
    valid = _valid_prompts(cfg, data_dir, index, tok)
    sizes = rl_sizes(rl, len(train), world)
    total_steps, steps_per_epoch = sizes["total_steps"], sizes["steps_per_epoch"]
    opt_steps = total_steps * rl.updates_per_rollout
    if rank == 0:
        print(f"[rl] prompts={len(train)} {data.counts} valid={len(valid)} world={world} G={G} "
              f"prompts/step={rl.prompts_per_step} micro={rl.prompts_per_micro} grad_accum={sizes['gas']} "
              f"steps/epoch={steps_per_epoch} steps={total_steps} reward={rl.reward} beta={rl.beta} "
              f"zero={rl.zero_stage} {rl.precision} shared_prompt_forward={shared > 1}", flush=True)

    inputs = {"model": model_dir, "data": data_dir, "sids": sids_dir,
              "semantics": semantics_file if "semantic" in rl.reward else None}
    meta = {"identity": rl_identity(cfg, inputs, world), "opt_steps": opt_steps}
    if ctx.resume_dir is not None:
        ckpt.check_meta(ctx.resume_dir, meta)

    # --- 2. policy engine and reference ---
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    micro_rows = rl.prompts_per_micro * G
    ds_config = deepspeed_config(_ds_view(rl, micro_rows, rl.prompts_per_step * G), world, on_gpu)
    dtype = torch.bfloat16 if rl.precision == "bf16" else torch.float32
    extra = {"attn_implementation": rl.attn_implementation} if rl.attn_implementation else {}

    def load_lm():
        keep_alive = None
        if rl.zero_stage == 3:  # partitioned loading (STACK.md 3.2)
            from transformers.integrations.deepspeed import HfDeepSpeedConfig
            keep_alive = HfDeepSpeedConfig(ds_config)
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
        del keep_alive
        return lm

    lm = load_lm()
    if rl.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if rl.lora.enabled:
        lm = apply_lora(lm, SimpleNamespace(lora=rl.lora), tok, model_dir)
    model = RlLM(lm).train()
    sched = lr_lambda(rl.scheduler, sizes["warmup"], opt_steps)
    engine, *_ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched))
    ref = _build_reference(rl, load_lm, ds_config, device)

    # --- 3. resume ---
    guard = ca.DegenerateRolloutGuard(C, rl.guard_equal_reward_steps, rl.max_invalid_sids)
    state: dict[str, Any] = {"step": -1, "best_ndcg": -1.0, "best_step": -1, "ref_syncs": 0, "equal_steps": 0,
                             "start_valid": None}
    rows: list[dict] = []
    if ctx.resume_dir is not None:
        loaded, rows = ckpt.load_checkpoint(engine, ctx.resume_dir, rank, expect_meta=meta)
        state.update({k: loaded[k] for k in state if k in loaded})
        rows = [r for r in rows if r.get("step", -1) <= state["step"]]
        if state["ref_syncs"] > 0:
            _load_reference(ref, Path(ctx.resume_dir), rank, rl.zero_stage)
        if rank == 0:
            print(f"[rl] resumed from {ctx.resume_dir} after step {state['step']}", flush=True)
    guard.equal_steps = int(state["equal_steps"])
    release = getattr(ctx, "release_resume", None)
    if release is not None:
        release()
    attempt = {"attempt/start_step": state["step"] + 1, "attempt/started_at": round(time.time(), 3)}

    # --- 4. the SFT start on valid: the first "best" (R7: RL never exports a worse-on-valid model) ---
    if state["start_valid"] is None and valid:
        start = _validate(engine, rl, cfg, valid, constraints, tok, rank, world)
        state.update(start_valid=start, best_ndcg=start["ndcg@10"], best_step=-1)
        # The start is a metrics row like every later evaluation (step -1 = before the first RL step), so
        # metrics.csv, the plot and the summary compare RL against its own start measured the same way.
        rows.append({"step": -1, "epoch": 0.0, **{f"eval/{k}": v for k, v in start.items()}, **attempt})
        _export(engine, tok, rl.zero_stage, rank, ctx, "best")
        if rank == 0:
            print("[rl] SFT start on valid: " + " ".join(f"{k} {v:.4f}" for k, v in start.items()), flush=True)

    # --- 5. train ---
    order_cache: dict[int, np.ndarray] = {}
    for step in range(state["step"] + 1, total_steps):
        t0 = time.perf_counter()
        share = rank_share(train, step, steps_per_epoch, rl.prompts_per_step, cfg.run.seed, rank, world, order_cache)
        micros = [share[i : i + rl.prompts_per_micro] for i in range(0, len(share), rl.prompts_per_micro)]
        # 5a. rollouts, rewards, advantages (no grad, policy in eval mode: no dropout in the search)
        engine.eval()
        batches, sums = [], torch.zeros(12, dtype=torch.float64)
        with gathered_policy(engine, rl.zero_stage) as policy:
            for m, mb in enumerate(micros):
                ids, mask = _left_pad([s.prompt_ids for s in mb], pad_id, device)
                ro = _rollout(rl, policy, ids, mask, constraints, G, suffix, (cfg.run.seed, step, rank, m))
                batches.append(_score(rl, ro, mb, constraints, sim, code_of, tok.eos_token_id, L, G, C, sums, device))
        t_roll = time.perf_counter() - t0
        # 5b. reference log-probs (no grad) and the old policy's for PPO ratios (> 1 update)
        for b in batches:
            with torch.no_grad():
                b["ref"] = _ref_logprobs(ref, rl.zero_stage, b, C, shared) if rl.beta > 0 else None
                b["old"] = engine(b["seq"], b["mask"], C, shared).float() if rl.updates_per_rollout > 1 else None
        engine.train()
        # 5c. policy updates
        loss_sum = torch.zeros(4, dtype=torch.float64)  # loss, kl, clip fraction, micro count
        for _ in range(rl.updates_per_rollout):
            for b in batches:
                logp = engine(b["seq"], b["mask"], C, shared)
                loss, st = ca.policy_loss(logp.float(), b["adv"], b["cmask"], old_logprobs=b["old"], ref_logprobs=b["ref"],
                                          beta=rl.beta, clip_eps=rl.clip_eps if rl.updates_per_rollout > 1 else None)
                engine.backward(loss)
                engine.step()
                loss_sum += torch.tensor([loss.item(), st.kl, st.clip_fraction, 1.0], dtype=torch.float64)
        dt = time.perf_counter() - t0
        g = _all_sum(torch.cat([sums, loss_sum]))
        stats = _global_stats(g, C)
        guard.check(step, stats)  # every rank sees the same global figures, so all stop together
        n_micro = max(g[15].item(), 1.0)
        row: dict[str, Any] = {
            "step": step, "epoch": step / steps_per_epoch,
            "train/loss": g[12].item() / n_micro, "train/kl": g[13].item() / n_micro,
            "train/clip_frac": g[14].item() / n_micro,
            "rollout/reward_mean": stats["reward_mean"], "rollout/reward_std": stats["reward_std"],
            "rollout/rank_reward_mean": stats["rank_reward_mean"], "rollout/semantic_mean": stats["semantic_mean"],
            "rollout/hit_share": stats["hit_share"], "rollout/target_rank": stats["target_rank"],
            "rollout/completion_len": stats["completion_len_max"], "rollout/invalid_sids": stats["invalid_sids"],
            "train/lr": engine.get_lr()[0], "time/rollout_s": t_roll, "time/update_s": dt - t_roll, "time/step_s": dt,
            "train/tokens_per_s": g[11].item() * rl.updates_per_rollout / dt,
            "rollout/prompts_per_s": g[10].item() / max(t_roll, 1e-9), **attempt,
        }
        state["step"], state["equal_steps"] = step, guard.equal_steps
        # 6. reference sync (TRL SyncRefModelCallback: every N optimiser steps)
        if ref is not None and rl.sync_ref and rl.ref_sync_every_steps > 0 and (step + 1) % rl.ref_sync_every_steps == 0:
            _sync_reference(ref, engine, rl)
            state["ref_syncs"] += 1
            row["train/ref_synced"] = 1
        # 7. valid ranking metrics, best model
        last = step == total_steps - 1
        if valid and ((step + 1) % rl.eval_every_steps == 0 or last):
            val = _validate(engine, rl, cfg, valid, constraints, tok, rank, world)
            row.update({f"eval/{k}": v for k, v in val.items()})
            if val["ndcg@10"] > state["best_ndcg"]:
                state.update(best_ndcg=val["ndcg@10"], best_step=step)
                _export(engine, tok, rl.zero_stage, rank, ctx, "best")
        logged = (step + 1) % rl.log_every_steps == 0 or "eval/ndcg@10" in row or last
        if logged:
            rows.append(row)
            if rank == 0:
                print(f"[rl] step {step + 1}/{total_steps} loss {row['train/loss']:.4f} reward {stats['reward_mean']:.4f}"
                      f"±{stats['reward_std']:.4f} hit {stats['hit_share']:.3f} kl {row['train/kl']:.5f} "
                      f"rollout {t_roll:.2f}s update {dt - t_roll:.2f}s"
                      + (f" valid ndcg@10 {row['eval/ndcg@10']:.4f}" if "eval/ndcg@10" in row else ""), flush=True)
        # 8. checkpoint (all ranks), report
        if (step + 1) % rl.save_every_steps == 0 or last:
            with tempfile.TemporaryDirectory(prefix="tsrec-rl-ckpt-") as d:
                ckpt.save_checkpoint(engine, Path(d), state, rank, rows, meta=meta)
                if state["ref_syncs"] > 0:
                    _save_reference(ref, Path(d), rank, rl.zero_stage)
                ctx.report(step, row, checkpoint_dir=Path(d))
        elif logged:
            ctx.report(step, row)
        maybe_fail(rl, step, rank, world)

    # --- 9. final model and logs ---
    _export(engine, tok, rl.zero_stage, rank, ctx, "final")
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="tsrec-rl-logs-") as d:
            write_rl_logs(rows, Path(d))
            ctx.save_artifact(Path(d), "logs")
    summary = valid_progress(rows)
    if rank == 0 and summary["start_valid_ndcg@10"] is not None:
        print(f"[rl] {progress_line(summary)}", flush=True)
    evals = [r for r in rows if "eval/ndcg@10" in r and r["step"] >= 0]
    return {"steps": state["step"] + 1, "start_valid": state["start_valid"], "best_step": state["best_step"], **summary,
            "final_valid": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else None,
            "prompts": len(train), "task_counts": data.counts, "dropped": data.dropped, "grad_accum": sizes["gas"],
            "steps_per_epoch": steps_per_epoch, "reward": rl.reward}


def valid_progress(rows: list[dict]) -> dict[str, Any]:
    """Start vs best valid NDCG@10 from the metrics rows (the start is the ``step`` -1 row).

    Steps are counted as RL steps done (an evaluation after row ``step`` s has s + 1 steps behind it):
    ``best_after_steps`` where the best valid NDCG@10 was first reached (0 = the start was never beaten),
    ``first_gain_after_steps`` the first evaluation above the start (None = never), i.e. how fast a run learns.
    """
    evals = [r for r in rows if "eval/ndcg@10" in r]
    start = next((r["eval/ndcg@10"] for r in evals if r["step"] < 0), None)
    out: dict[str, Any] = {"start_valid_ndcg@10": start, "best_valid_ndcg@10": None, "best_after_steps": None,
                           "valid_ndcg@10_gain": None, "first_gain_after_steps": None,
                           "valid_ndcg@10_by_steps": {int(r["step"]) + 1: r["eval/ndcg@10"] for r in evals}}
    if not evals:
        return out
    best = max(evals, key=lambda r: (r["eval/ndcg@10"], -r["step"]))  # the earliest of equal bests
    out.update({"best_valid_ndcg@10": best["eval/ndcg@10"], "best_after_steps": int(best["step"]) + 1})
    if start is not None:
        out["valid_ndcg@10_gain"] = best["eval/ndcg@10"] - start
        out["first_gain_after_steps"] = next((int(r["step"]) + 1 for r in evals if r["step"] >= 0
                                              and r["eval/ndcg@10"] > start), None)
    return out


def progress_line(p: dict[str, Any]) -> str:
    """One line: ``valid NDCG@10 start 0.2100 -> best 0.2400 after 30 steps (+0.0300; first gain after 10 steps)``."""
    if p.get("start_valid_ndcg@10") is None:
        return "valid NDCG@10: no start evaluation"
    gain = p["valid_ndcg@10_gain"]
    first = p["first_gain_after_steps"]
    return (f"valid NDCG@10 start {p['start_valid_ndcg@10']:.4f} -> best {p['best_valid_ndcg@10']:.4f} after "
            f"{p['best_after_steps']} steps ({gain:+.4f}; "
            + (f"first gain after {first} steps)" if first is not None else "never above the start)"))


# ------------------------------------------------------------------------------------------------------
# Pieces of a step
# ------------------------------------------------------------------------------------------------------


def _left_pad(prompt_ids, pad_id, device):
    from tsrec.decode.beam import left_pad

    return left_pad(prompt_ids, pad_id, device)


def _rollout(rl: RlConfig, policy, ids, mask, constraints, G, suffix, draw_key: tuple[int, ...]):
    """Beam rollouts, or constrained samples from a generator seeded by ``draw_key`` (seed, step, rank,
    micro-batch): a resumed or repeated step draws the same completions, whatever ran before it."""
    from tsrec.decode.rollout import generate_rollouts, sample_rollouts

    if rl.rollout == "beam":
        return generate_rollouts(policy, ids, mask, constraints, G, suffix_ids=suffix)
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
    """Global per-step figures from the all-reduced sums (same keys as ``core_algos.rollout_stats``)."""
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


def _semantic_tables(rl: RlConfig, semantics_file, constraints, tok, device):
    """Token-similarity tables and the vocabulary-id -> code lookup, for the semantic rewards (else None)."""
    if "semantic" not in rl.reward:
        return None, None
    from tsrec.semantics.records import read_teacher_file

    if semantics_file is None or not Path(semantics_file).exists():
        raise ConfigError(f"rl.reward={rl.reward} needs the teacher file (--semantics, description_keywords.json)")
    if rl.semantic_similarity != "jaccard":
        raise ConfigError("rl.semantic_similarity=embedding is not wired into the training loop yet; use jaccard")
    code_of = ca.sid_code_lookup(tok.get_vocab(), len(tok)).to(device)
    num_codes = [int(code_of[ids].max()) + 1 for ids in constraints.level_token_ids]
    sim = ca.build_token_similarity(read_teacher_file(semantics_file), num_codes, method="jaccard").to(device)
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


def _valid_prompts(cfg: Config, data_dir: Path, index, tok) -> list[dict[str, Any]]:
    """The fixed valid sample (``rl.valid_sample_size`` seeded rows, as ``tsrec.rl.data`` draws them) with
    the evaluation prompts of ``tsrec eval`` (stage ``eval`` wording), tokenised, with target SID ids."""
    from tsrec.data.schema import read_split
    from tsrec.decode.evaluate import build_prompt_texts
    from tsrec.rl.data import valid_sample
    from tsrec.sid.index import split_sid

    table = read_split(data_dir, "valid")
    rows = [{"row": i, "user_id": str(u), "history_item_ids": list(h or []), "item_id": int(t)}
            for i, (u, h, t) in enumerate(zip(table.column("user_id").to_pylist(),
                                              table.column("history_item_ids").to_pylist(),
                                              table.column("item_id").to_pylist()))]
    rows = [rows[i] for i in valid_sample(len(rows), cfg.rl.valid_sample_size, cfg.run.seed)]
    out = []
    for r in build_prompt_texts(rows, index, cfg.prompts.mode, source=str(Path(data_dir) / "valid.parquet")):
        target = [int(i) for i in tok.convert_tokens_to_ids(split_sid(r["target_sid"]))]
        out.append({"ids": prompts.encode_prompt(tok, r["_sample"]), "target": target})
    return out


def _validate(engine, rl: RlConfig, cfg: Config, valid, constraints, tok, rank: int, world: int) -> dict[str, float]:
    """Valid HR/NDCG@{3,5,10} with the evaluation decoder (``eval.batch_size``, ``rl.eval_beams``, upstream
    suffix scoring as ``tsrec eval``), rows sharded over ranks, sums all-reduced."""
    from tsrec.decode.beam import constrained_beam_search
    from tsrec.decode.evaluate import score_suffix_enabled, upstream_suffix_ids

    suffix = upstream_suffix_ids(tok, constraints) if score_suffix_enabled(cfg) else []
    beams = min(rl.eval_beams, constraints.num_sids)
    ks = [k for k in EVAL_KS if k <= beams]
    share = [valid[i] for i in np.array_split(np.arange(len(valid)), world)[rank]]
    acc = torch.zeros(2 * len(ks) + 1, dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    with gathered_policy(engine, rl.zero_stage) as policy:
        bs = cfg.eval.batch_size
        for i in range(0, len(share), bs):
            chunk = share[i : i + bs]
            ids, mask = _left_pad([r["ids"] for r in chunk], tok.eos_token_id, constraints.device)
            out = constrained_beam_search(policy, ids, mask, constraints, beams, score_suffix_ids=suffix)
            target = torch.tensor([r["target"] for r in chunk], device=ids.device)
            hit = (out.sid_token_ids == target.unsqueeze(1)).all(-1)  # (b, K)
            rank_of = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(hit[:, 0], -1, dtype=torch.long))
            for j, k in enumerate(ks):
                inside = (rank_of >= 0) & (rank_of < k)
                acc[2 * j] += inside.double().sum().cpu()
                acc[2 * j + 1] += torch.where(inside, 1.0 / torch.log2(rank_of.double() + 2), torch.zeros_like(rank_of, dtype=torch.float64)).sum().cpu()
            acc[-1] += len(chunk)
    if was_training:
        engine.train()
    acc = _all_sum(acc)
    n = max(acc[-1].item(), 1.0)
    out: dict[str, float] = {}
    for j, k in enumerate(ks):
        out[f"hr@{k}"] = acc[2 * j].item() / n
        out[f"ndcg@{k}"] = acc[2 * j + 1].item() / n
    out.setdefault("ndcg@10", out[f"ndcg@{ks[-1]}"])
    return out


def _export(engine, tok, stage, rank, ctx, name) -> None:
    with tempfile.TemporaryDirectory(prefix=f"tsrec-rl-{name}-") as d:
        ckpt.export_hf(engine, tok, Path(d), stage, rank)
        if rank == 0:
            ctx.save_artifact(Path(d), name)


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    from tsrec.sft.loop import all_sum

    return all_sum(t)


# ------------------------------------------------------------------------------------------------------
# Logs
# ------------------------------------------------------------------------------------------------------


def write_rl_logs(rows: list[dict], out_dir: Path) -> None:
    """``metrics.csv``, ``tensorboard/`` and ``rl.png`` (reward, KL, valid NDCG@10 against the step)."""
    from tsrec.sft.logs import write_tensorboard

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_metrics_csv(out_dir / "metrics.csv", rows)
    write_tensorboard(rows, out_dir / "tensorboard")
    plot_rl(rows, out_dir / "rl.png")


def plot_rl(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("rollout/reward_mean", "train/kl", "eval/ndcg@10"),
                              ("reward (mean)", "KL to reference (k3)", "valid NDCG@10")):
        # x = RL steps done, so the start (row step -1) sits at 0 on the valid NDCG@10 curve
        pts = [(r["step"] + 1, r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None)
        ax.set_title(title)
        ax.set_xlabel("RL steps done")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: ``python -m torch.distributed.run --nproc_per_node N -m tsrec.rl.loop --config F``."""
    import argparse

    from tsrec.config import load_config
    from tsrec.runtime import LocalContext

    p = argparse.ArgumentParser(prog="tsrec.rl.loop")
    p.add_argument("--config")
    p.add_argument("--model"), p.add_argument("--data"), p.add_argument("--sids"), p.add_argument("--semantics")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    root = Path(cfg.run.out_dir)
    sem = Path(a.semantics) if a.semantics else root / "semantics" / "description_keywords.json"
    result = train_rl(cfg, Path(a.model or root / "sft" / "model"), Path(a.data or root / "data"),
                      Path(a.sids or root / "sids"), sem if sem.exists() else None, LocalContext(Path(a.out) if a.out else root / "rl"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
