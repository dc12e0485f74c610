"""SFT training loop on a DeepSpeed engine (METHOD.md 1.6, 3.1; requirements R5, R6).

One loop for a single process, a torchrun rank and a Ray Train ``TorchTrainer`` worker: where it runs
is the :class:`tsrec.runtime.RunContext` it is given. Inputs: a model folder (``tsrec model init``:
backbone + SID tokens), a data folder, a SID folder and the teacher file (TS-Align). Outputs through
the context: checkpoints (``tsrec.sft.checkpoint``), artifacts ``best/`` and ``final/`` (Hugging Face
folders with the tokenizer) and ``logs/`` (``metrics.csv``, TensorBoard events, ``loss.png``).

    python -m torch.distributed.run --nproc_per_node 2 -m tsrec.sft.loop --config configs/sft_demo.yaml

Per optimiser step: the step's ``global_batch_size`` samples (a fixed, seeded order per epoch, so the
data position is the step number) are split across ranks, packed (or padded) into exactly
``gradient_accumulation_steps`` micro-batches per rank, and the loss is the weighted token mean over the
whole step (``packing.py``). Validation loss every ``eval_every_steps``, early stopping with patience,
best model kept.

Differs from MiniOneRec: DeepSpeed ZeRO instead of DDP; packing; logits only at supervised positions;
per-task loss weights and shares; exact resume (optimizer, scheduler, data position, RNG).
"""

from __future__ import annotations

import importlib
import math
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tsrec.config import Config, ConfigError, SftConfig
from tsrec.runtime import RunContext
from tsrec.sft import checkpoint as ckpt
from tsrec.sft.flops import flop_model
from tsrec.sft.logs import write_logs
from tsrec.sft.packing import forward_hidden, micro_batches, weighted_token_loss
from tsrec.sft.tasks import TASK_NAMES, build_mixture, tokenize_samples

# Dense bf16 peak FLOP/s per GPU for the MFU estimate (GPU only; CPU reports none).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class SftLM(torch.nn.Module):
    """Wraps a causal LM so DeepSpeed's forward is the SFT loss: hidden states, then the LM head only
    at supervised positions (R6)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        hidden = forward_hidden(self.lm, batch)
        return weighted_token_loss(hidden, self.lm.get_output_embeddings(), batch)


def deepspeed_config(cfg: SftConfig, world_size: int, on_gpu: bool = False) -> dict[str, Any]:
    """The one place that maps ``sft`` config to a DeepSpeed dict (ZeRO, precision, offload, optimizer)."""
    gas = gradient_accumulation(cfg, world_size)
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.lora.enabled and cfg.zero_stage == 3:
        raise ConfigError("sft.lora.enabled: LoRA runs with sft.zero_stage 0 or 2 (its trainable state is small)")
    if cfg.offload_params:
        if cfg.zero_stage != 3:
            raise ConfigError("sft.offload_params: parameter offload needs sft.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # CPU: no FusedAdam; torch's AdamW. With optimizer offload DeepSpeed uses DeepSpeedCPUAdam (JIT build).
    adam = {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.weight_decay}
    if not on_gpu and not cfg.offload_optimizer:
        adam["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": cfg.micro_batch_size * gas * world_size,
        "gradient_clipping": cfg.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_allow_untested_optimizer": True,
    }


def gradient_accumulation(cfg: SftConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"sft.global_batch_size={cfg.global_batch_size} is not a multiple of "
                          f"sft.micro_batch_size x workers = {per_step}")
    return cfg.global_batch_size // per_step


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up from 0, then linear decay to 0 at ``total_steps`` (the HF default schedule)."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def train_sft(cfg: Config, model_dir: Path, data_dir: Path, sids_dir: Path, semantics_file: Path | None,
              ctx: RunContext) -> dict[str, Any]:
    """Run SFT; returns a summary (steps, best/final validation loss, derived sizes)."""
    sft = cfg.sft
    rank, world = ctx.rank, ctx.world_size
    on_gpu = torch.cuda.is_available()
    # --- 0. process group and DeepSpeed ---
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not on_gpu:  # skip the ~35 s shm-op JIT build on CPU (STACK.md 2); same losses
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if on_gpu:
        torch.cuda.set_device(torch.device(ctx.device))  # DeepSpeed places the engine on the current device
    ensure_dist_env()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

    # --- 1. data: mixture, tokenised, validation ---
    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    mix = build_mixture(cfg, data_dir, sids_dir, semantics_file if sft.use_ts_align else None)
    train = tokenize_samples(tok, mix.train, sft.cutoff_len, sft)
    valid = tokenize_samples(tok, mix.valid, sft.cutoff_len, sft)
    for s in valid:
        s.loss_weight = 1.0  # validation loss is the plain token mean

    # --- 2. derived sizes (printed once) ---
    gas = gradient_accumulation(sft, world)
    pack_len = sft.pack_len or sft.cutoff_len
    steps_per_epoch = math.ceil(len(train) / sft.global_batch_size)
    total_steps = sft.max_steps or math.ceil(sft.epochs * steps_per_epoch)
    # LR decays to 0 over `epochs` (as the public run: early stopping ends before); a longer max_steps
    # stretches the horizon so the LR never sits at 0.
    decay_steps = max(math.ceil(sft.epochs * steps_per_epoch), total_steps)
    if rank == 0:
        print(f"[sft] samples={len(train)} {mix.counts} valid={len(valid)} world={world} micro={sft.micro_batch_size} "
              f"grad_accum={gas} global_batch={sft.global_batch_size} steps/epoch={steps_per_epoch} "
              f"steps={total_steps} decay_steps={decay_steps} packing={sft.packing} pack_len={pack_len} zero={sft.zero_stage} {sft.precision}",
              flush=True)

    # A checkpoint is resumed only by the same run (config, inputs, world size, LR horizon): checked
    # before any model is built, so a changed config fails fast instead of continuing old weights.
    meta = {"identity": ckpt.run_identity(cfg, {"model": model_dir, "data": data_dir, "sids": sids_dir,
                                                "semantics": semantics_file if sft.use_ts_align else None}, world),
            "decay_steps": decay_steps}
    if ctx.resume_dir is not None:
        ckpt.check_meta(ctx.resume_dir, meta)

    # --- 3. model, LoRA, engine (the engine before resume: DeepSpeed owns the param groups) ---
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    ds_config = deepspeed_config(sft, world, on_gpu)
    dtype = torch.bfloat16 if sft.precision == "bf16" else torch.float32
    keep_alive = None
    if sft.zero_stage == 3:  # partitioned loading (STACK.md 3.2): params are created under zero.Init
        from transformers.integrations.deepspeed import HfDeepSpeedConfig
        keep_alive = HfDeepSpeedConfig(ds_config)
    extra = {"attn_implementation": sft.attn_implementation} if sft.attn_implementation else {}
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
    if sft.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if sft.lora.enabled:
        lm = apply_lora(lm, sft, tok, model_dir)
    # MFU counts model FLOPs as trained (tsrec/sft/flops.py): under LoRA only the SID rows of the head
    # get a weight gradient, and frozen weights none.
    flops = flop_model(lm, head_trainable_rows=len(_sid_token_ids(tok)) if sft.lora.enabled else None)
    model = SftLM(lm).train()
    engine, *_ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sft.warmup_steps, decay_steps)))
    del keep_alive
    ranking = None
    if sft.valid_ranking_sample > 0:  # sweeps (tsrec tune): valid HR/NDCG@K with the constrained decoder
        from tsrec.tune.ranking import ValidRanking
        ranking = ValidRanking(cfg, data_dir, sids_dir, tok, str(engine.device), rank, world)
    _check_best_metric(sft, ranking)

    # --- 4. resume ---
    state = {"step": -1, "best_val": float("inf"), "bad_evals": 0, "stopped": False}
    rows: list[dict] = []
    if ctx.resume_dir is not None:
        loaded, rows = ckpt.load_checkpoint(engine, ctx.resume_dir, rank, expect_meta=meta)
        state.update({k: loaded[k] for k in state if k in loaded})
        rows = [r for r in rows if r.get("step", -1) <= state["step"]]
        if rank == 0:
            print(f"[sft] resumed from {ctx.resume_dir} after step {state['step']}", flush=True)
    release = getattr(ctx, "release_resume", None)  # a downloaded (cloud) checkpoint is no longer needed
    if release is not None:
        release()
    # Every row says which attempt computed it (its first step and start time), so a resumed run
    # shows that it did not recompute the steps before its checkpoint.
    attempt = {"attempt/start_step": state["step"] + 1, "attempt/started_at": round(time.time(), 3)}

    # --- 5. train ---
    order_cache: dict[int, np.ndarray] = {}
    step = state["step"]
    for step in range(state["step"] + 1, total_steps):
        if state["stopped"]:
            break
        t0 = time.perf_counter()
        share = rank_share(train, step, steps_per_epoch, sft.global_batch_size, cfg.run.seed, rank, world, order_cache)
        batches = micro_batches(share, gas, sft.packing, pack_len, sft.micro_batch_size, pad_id)
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
        counts = all_sum(torch.cat([loss_sum, task_sum, task_cnt,
                                     torch.tensor([sum(b.real_tokens for b in batches), sum(b.total_tokens for b in batches),
                                                   sum(flops.step_flops(b.real_tokens, int((b.targets != -100).sum()),
                                                                        b.sample_lengths) for b in batches)],
                                                  dtype=torch.float64)]))
        dt = time.perf_counter() - t0
        k = len(TASK_NAMES)
        real, total_tok = counts[1 + 2 * k].item(), counts[2 + 2 * k].item()
        row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch,
                               "train/loss": counts[0].item() / max(weight_total, 1e-12),
                               "train/lr": engine.get_lr()[0], "train/tokens_per_s": real / dt,
                               "train/padding_frac": 1 - real / max(total_tok, 1), "train/step_s": dt, **attempt}
        for i, name in enumerate(TASK_NAMES):
            if counts[1 + k + i] > 0:
                row[f"train/loss/{name}"] = (counts[1 + i] / counts[1 + k + i]).item()
        if on_gpu:
            row["train/mfu"] = counts[3 + 2 * k].item() / dt / (_peak_flops() * world)

        # --- 6. validation, early stopping, best model ---
        last = step == total_steps - 1
        if valid and ((step + 1) % sft.eval_every_steps == 0 or last):
            val = _validate(engine, valid, sft.micro_batch_size, pad_id, rank, world)
            row["eval/loss"] = val
            if ranking is not None:
                row.update({f"eval/{k}": v for k, v in ranking(engine).items()})
            # state["best_val"] is the best score so far, lower is better: valid loss, or a ranking metric negated.
            score = val if sft.best_metric == "loss" else -row[f"eval/{sft.best_metric}"]
            if score < state["best_val"]:
                state.update(best_val=score, bad_evals=0)
                _export(engine, tok, sft.zero_stage, rank, ctx, "best")
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
                # one short progress line; every column of the row is in metrics.csv / TensorBoard
                tasks = " ".join(f"{k.rsplit('/', 1)[1]} {v:.3f}" for k, v in row.items() if k.startswith("train/loss/"))
                print(f"[sft] step {step + 1}/{total_steps} loss {row['train/loss']:.4f} ({tasks})"
                      + (f" valid {row['eval/loss']:.4f}" if "eval/loss" in row else "")
                      + f" {row['train/tokens_per_s']:.0f} tok/s", flush=True)

        # --- 7. checkpoint (all ranks), report ---
        if (step + 1) % sft.save_every_steps == 0 or last or state["stopped"]:
            with tempfile.TemporaryDirectory(prefix="tsrec-sft-ckpt-") as d:
                ckpt.save_checkpoint(engine, Path(d), state, rank, rows, meta=meta)
                ctx.report(step, row, checkpoint_dir=Path(d))
        elif logged:
            # A Ray Train report is a round trip to the controller: only logged steps pay for it.
            ctx.report(step, row)
        maybe_fail(sft, step, rank, world)

    # --- 8. final model and logs ---
    _export(engine, tok, sft.zero_stage, rank, ctx, "final")
    if rank == 0:
        with tempfile.TemporaryDirectory(prefix="tsrec-sft-logs-") as d:
            write_logs(rows, Path(d))
            ctx.save_artifact(Path(d), "logs")
    final = [r for r in rows if "eval/loss" in r]
    return {"steps": state["step"] + 1, "best_val_loss": min((r["eval/loss"] for r in final), default=float("inf")),
            "final_val_loss": final[-1]["eval/loss"] if final else None,
            "final_train_loss": rows[-1]["train/loss"] if rows else None, "early_stopped": state["stopped"],
            "grad_accum": gas, "steps_per_epoch": steps_per_epoch, "samples": len(train), "task_counts": mix.counts,
            "first_val_loss": final[0]["eval/loss"] if final else None}


def _check_best_metric(sft: SftConfig, ranking) -> None:
    """ConfigError unless ``sft.best_metric`` is "loss" or a metric the valid ranking probe reports."""
    if sft.best_metric == "loss":
        return
    known = [f"{m}@{k}" for k in ranking.ks for m in ("hr", "ndcg")] if ranking is not None else []
    if sft.best_metric not in known:
        raise ConfigError(f"sft.best_metric={sft.best_metric!r}: expected 'loss' or one of the valid ranking metrics "
                          f"{known or '(none: sft.valid_ranking_sample is 0)'}")


def rank_share(train, step, steps_per_epoch, global_batch, seed, rank, world, cache):
    """This rank's samples of optimiser step ``step``: a seeded permutation per epoch, contiguous slices."""
    epoch, b = divmod(step, steps_per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = np.random.default_rng([seed, epoch]).permutation(len(train)) if epoch else np.arange(len(train))
    idx = cache[epoch][b * global_batch : (b + 1) * global_batch]
    return [train[i] for i in np.array_split(idx, world)[rank]]


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


def _export(engine, tok, stage, rank, ctx, name) -> None:
    with tempfile.TemporaryDirectory(prefix=f"tsrec-sft-{name}-") as d:
        ckpt.export_hf(engine, tok, Path(d), stage, rank)
        if rank == 0:
            ctx.save_artifact(Path(d), name)


def _sid_token_ids(tok) -> list[int]:
    """Ids of the SID tokens (``<a_12>``: "<", a level letter, "_") among the tokenizer's added tokens."""
    return sorted(i for t, i in tok.get_added_vocab().items() if t.startswith("<") and t[1:2].isalpha() and t[2:3] == "_")


def apply_lora(lm, sft: SftConfig, tok, model_dir: Path):
    """LoRA on ``sft.lora.target_modules``; the SID-token rows of the embedding and of the LM head train.

    Tied backbones share one matrix, so the embedding's trainable rows are the head's (peft ties them).
    Untied backbones (Qwen2.5-7B/14B) have a separate head whose SID rows would otherwise stay at
    their initialisation and could never be predicted well: both modules get the rows.
    """
    from peft import LoraConfig, get_peft_model

    sid_ids = _sid_token_ids(tok)
    rows = None
    if sid_ids:
        names = {id(m): n for n, m in lm.named_modules()}
        rows = {names[id(lm.get_input_embeddings())]: sid_ids}
        text_cfg = lm.config.get_text_config()
        if not getattr(text_cfg, "tie_word_embeddings", False):
            rows[names[id(lm.get_output_embeddings())]] = sid_ids
    conf = LoraConfig(r=sft.lora.r, lora_alpha=sft.lora.alpha, lora_dropout=sft.lora.dropout,
                      target_modules=list(sft.lora.target_modules), task_type="CAUSAL_LM",
                      trainable_token_indices=rows)
    return get_peft_model(lm, conf)


def maybe_fail(sft: SftConfig, step: int, rank: int, world: int) -> None:
    """Testing hook (``sft.fail_at_step``): the last rank dies once, as a crashed worker would."""
    if step != sft.fail_at_step or rank != world - 1:
        return
    marker = Path(sft.fail_marker) if sft.fail_marker else None
    if marker is not None and marker.exists():
        return
    if marker is not None:
        marker.touch()
    print(f"[sft] fault injection: rank {rank} SIGKILLs itself after step {step}", flush=True)
    # Ray Train's controller polls each worker's last report (a queue of one); a kill within
    # milliseconds of a checkpoint report can beat that poll on a loaded machine, and the restart then
    # finds an older checkpoint. A crash in a real run comes long after its last report.
    time.sleep(3.0)
    os.kill(os.getpid(), signal.SIGKILL)


def ensure_dist_env() -> None:
    """A single process without torchrun still needs a (1-rank) process group for DeepSpeed."""
    import socket

    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def all_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = torch.device("cuda") if torch.cuda.is_available() and dist.get_backend() == "nccl" else torch.device("cpu")
        t = t.to(dev)
        dist.all_reduce(t)
        t = t.cpu()
    return t



def _to(batch, device):
    import dataclasses

    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)
                                         if isinstance(getattr(batch, f.name), torch.Tensor)})


def _peak_flops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: ``python -m torch.distributed.run --nproc_per_node N -m tsrec.sft.loop --config F``."""
    import argparse
    import json

    from tsrec.config import load_config
    from tsrec.runtime import LocalContext

    p = argparse.ArgumentParser(prog="tsrec.sft.loop")
    p.add_argument("--config")
    p.add_argument("--model"), p.add_argument("--data"), p.add_argument("--sids"), p.add_argument("--semantics")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    root = Path(cfg.run.out_dir)
    out = Path(a.out) if a.out else root / "sft"
    sem = Path(a.semantics) if a.semantics else root / "semantics" / "description_keywords.json"
    result = train_sft(cfg, Path(a.model or root / "model"), Path(a.data or root / "data"), Path(a.sids or root / "sids"),
                       sem if sem.exists() else None, LocalContext(out))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2, default=str))
    # Tear the process group down before the interpreter exits: left to exit, gloo's threads are destroyed
    # while still joinable and a rank can abort ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
