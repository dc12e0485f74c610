"""The DeepSpeed engine of a training recipe: the config dict, the model (ZeRO-3 partitioned loading,
gradient checkpointing, LoRA) and the engine with its optimizer and LR schedule.

DeepSpeed is configuration, not architecture (STYLE.md 2): :func:`deepspeed_config` is the one place that
maps a stage's config (``sft`` or ``rl``, read into an :class:`EngineSpec`) to a ZeRO dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tsrec.config import ConfigError, LoraConfig, RlConfig, SftConfig


GPU_BUCKET = 100_000_000  # elements of the reduce / all-gather buckets on GPUs (overlap_comm)


@dataclass(frozen=True)
class EngineSpec:
    """What the engine needs from a training stage's config section, with the stage's batch shape."""

    section: str  # "sft" or "rl": names the config keys in errors
    micro_batch_size: int  # rows per forward on one rank
    grad_accum: int  # micro-batches per optimiser step on one rank
    zero_stage: int
    precision: str  # "fp32" or "bf16"
    lr: float
    weight_decay: float
    grad_clip: float
    offload_optimizer: bool
    offload_params: bool
    lora: bool

    @classmethod
    def of(cls, section: str, conf: SftConfig | RlConfig, micro_batch_size: int, grad_accum: int) -> EngineSpec:
        return cls(section=section, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                   zero_stage=conf.zero_stage, precision=conf.precision, lr=conf.lr, weight_decay=conf.weight_decay,
                   grad_clip=conf.grad_clip, offload_optimizer=conf.offload_optimizer,
                   offload_params=conf.offload_params, lora=conf.lora.enabled)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def deepspeed_config(spec: EngineSpec, world_size: int, on_gpu: bool = False) -> dict[str, Any]:
    """The DeepSpeed dict (ZeRO, precision, offload, optimizer) of one training stage."""
    s = spec.section
    zero: dict[str, Any] = {"stage": spec.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if on_gpu and spec.zero_stage in (2, 3):
        # Overlap ZeRO-2/3's gradient reduce-scatter (and ZeRO-3's gathers) with compute. Its buffers are about
        # 4.5x the reduce + all-gather buckets, so the buckets are bounded (1.7 GiB in bf16 instead of DeepSpeed's
        # 9 GiB at 5e8 elements); `tsrec plan` counts them (tsrec/plan/planner.py). CPU (gloo) gains nothing.
        zero.update(overlap_comm=True, reduce_bucket_size=GPU_BUCKET, allgather_bucket_size=GPU_BUCKET)
    if spec.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if spec.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if spec.lora and spec.zero_stage == 3:
        raise ConfigError(f"{s}.lora.enabled: LoRA runs with {s}.zero_stage 0 or 2 (its trainable state is small)")
    if spec.offload_params:
        if spec.zero_stage != 3:
            raise ConfigError(f"{s}.offload_params: parameter offload needs {s}.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # FusedAdam only where its op is prebuilt (the cluster image builds it): elsewhere DeepSpeed would JIT-build
    # it at the first step (minutes, and nvcc needed), so torch's AdamW; CPU has no FusedAdam at all. With
    # optimizer offload DeepSpeed uses DeepSpeedCPUAdam (JIT build).
    adam = {"lr": spec.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": spec.weight_decay}
    if not spec.offload_optimizer and not (on_gpu and _fused_adam_prebuilt()):
        adam["torch_adam"] = True
    return {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "train_batch_size": spec.micro_batch_size * spec.grad_accum * world_size,
        "gradient_clipping": spec.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": spec.precision == "bf16"},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_allow_untested_optimizer": True,
    }


def _fused_adam_prebuilt() -> bool:
    from deepspeed.git_version_info import installed_ops

    return bool(installed_ops.get("fused_adam"))


def load_causal_lm(model_dir: Path, dtype: torch.dtype, attn_implementation: str, ds_config: dict[str, Any]):
    """The Hugging Face causal LM of ``model_dir``; under ZeRO-3 its parameters are created partitioned
    (``HfDeepSpeedConfig`` alive while loading: STACK.md 3.2), so no rank ever holds the whole model."""
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
    del keep_alive
    return lm


def prepare_for_training(lm, gradient_checkpointing: bool, lora: LoraConfig, tok):
    """Gradient checkpointing (non-reentrant), then LoRA when enabled (:func:`apply_lora`)."""
    if gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(lm, lora, tok) if lora.enabled else lm


def apply_lora(lm, lora: LoraConfig, tok):
    """LoRA on ``lora.target_modules``; the SID-token rows of the embedding and of the LM head train.

    Tied backbones share one matrix, so the embedding's trainable rows are the head's (peft ties them).
    Untied backbones (Qwen2.5-7B/14B) have a separate head whose SID rows would otherwise stay at
    their initialisation and could never be predicted well: both modules get the rows.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    sid_ids = sid_token_ids(tok)
    rows = None
    if sid_ids:
        names = {id(m): n for n, m in lm.named_modules()}
        rows = {names[id(lm.get_input_embeddings())]: sid_ids}
        text_cfg = lm.config.get_text_config()
        if not getattr(text_cfg, "tie_word_embeddings", False):
            rows[names[id(lm.get_output_embeddings())]] = sid_ids
    conf = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                          trainable_token_indices=rows)
    return get_peft_model(lm, conf)


def sid_token_ids(tok) -> list[int]:
    """Ids of the SID tokens (``<a_12>``: "<", a level letter, "_") among the tokenizer's added tokens."""
    return sorted(i for t, i in tok.get_added_vocab().items() if t.startswith("<") and t[1:2].isalpha() and t[2:3] == "_")


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], schedule: Callable[[int], float]):
    """``deepspeed.initialize`` over the trainable parameters, with a ``LambdaLR(schedule)`` scheduler.
    Build it before loading a checkpoint: DeepSpeed owns the param groups the optimizer state refers to."""
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, config=ds_config, model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def seed_everything(seed: int) -> None:
    """python, numpy and torch RNGs: model init (LoRA, new rows) and dropout draw the same numbers."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
