"""The SFT loop in one process (LocalContext, DeepSpeed ZeRO-2, world size 1): learns, exports, resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch

from sft_synth import assert_resumed_after, make_tiny_run
from shared_data import assert_greedy_generate
from tsrec.config import load_config
from tsrec.runtime import LocalContext
from tsrec.train.checkpoint import CheckpointMismatchError
from tsrec.train.metrics import read_metrics_csv
from tsrec.sft.loop import train_sft

BASE = ["sft.global_batch_size=8", "sft.micro_batch_size=4", "sft.lr=3e-3", "sft.warmup_steps=2", "sft.zero_stage=2",
        "sft.eval_every_steps=4", "sft.save_every_steps=4", "sft.precision=fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("sft_tiny"))


def _run(tiny, root, *overrides):
    cfg = load_config(None, [*BASE, *overrides])
    return train_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(root))


def test_loop_learns_exports_and_resumes_exactly(tiny, tmp_path):
    full = _run(tiny, tmp_path / "full", "sft.max_steps=8")
    assert full["final_val_loss"] < 0.85 * full["first_val_loss"]
    rows = read_metrics_csv(tmp_path / "full" / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(8))
    assert all(0 <= r["train/padding_frac"] < 1 and r["train/tokens_per_s"] > 0 for r in rows)
    assert {"train/loss/next_sid", "train/loss/history_title"} <= set(rows[0])
    assert (tmp_path / "full" / "logs" / "loss.png").stat().st_size > 0
    assert any((tmp_path / "full" / "logs" / "tensorboard").iterdir())

    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("best", "final"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / name)
        tok = AutoTokenizer.from_pretrained(tmp_path / "full" / name)
        assert tok.convert_tokens_to_ids("<a_1>") != tok.unk_token_id
        assert_greedy_generate(model, tok, "The user", 3)

    # Stop after 4 steps, then continue to 8 from the checkpoint: the same curve.
    _run(tiny, tmp_path / "resumed", "sft.max_steps=4")
    resumed = _run(tiny, tmp_path / "resumed", "sft.max_steps=8")
    assert resumed["steps"] == 8
    again = read_metrics_csv(tmp_path / "resumed" / "logs" / "metrics.csv")
    assert [r["step"] for r in again] == list(range(8))
    assert_resumed_after(again, 3)
    for a, b in zip(rows, again):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-6
    assert abs(full["final_val_loss"] - resumed["final_val_loss"]) < 1e-6

    # A changed config never continues these checkpoints: named error before any model is built.
    with pytest.raises(CheckpointMismatchError, match="identity"):
        _run(tiny, tmp_path / "resumed", "sft.max_steps=8", "sft.lr=3e-2")


@pytest.mark.parametrize("overrides, dtype", [(["sft.zero_stage=0"], torch.float32),
                                              (["sft.precision=bf16"], torch.bfloat16)], ids=["zero0", "bf16"])
def test_loop_runs_zero0_and_bf16(tiny, tmp_path, overrides, dtype):
    from transformers import AutoModelForCausalLM

    result = _run(tiny, tmp_path, "sft.max_steps=2", "sft.eval_every_steps=2", *overrides)
    assert result["steps"] == 2 and math.isfinite(result["final_val_loss"])
    rows = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    assert rows[1]["train/loss"] < rows[0]["train/loss"] + 0.5 and rows[1]["train/lr"] > 0
    # The engine trained in the asked precision: the exported weights are in it.
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype="auto").dtype == dtype


def test_resume_under_zero3(tiny, tmp_path):
    """ZeRO-3 (partitioned params and optimizer): drop the last checkpoint and rerun; the run resumes
    from the one before and reproduces its own later steps."""
    import shutil

    _run(tiny, tmp_path, "sft.zero_stage=3", "sft.max_steps=4", "sft.save_every_steps=2", "sft.eval_every_steps=2")
    first = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    shutil.rmtree(tmp_path / "checkpoints" / "step_3")
    _run(tiny, tmp_path, "sft.zero_stage=3", "sft.max_steps=4", "sft.save_every_steps=2", "sft.eval_every_steps=2")
    again = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    assert [r["step"] for r in again] == list(range(4))
    assert_resumed_after(again, 1)
    for a, b in zip(first, again):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-5
    assert abs(first[-1]["eval/loss"] - again[-1]["eval/loss"]) < 1e-5


def test_lora_trains_sid_rows_only(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _run(tiny, tmp_path, "sft.max_steps=2", "sft.lora.enabled=true", "sft.lora.r=4", "sft.gradient_checkpointing=true",
         "sft.eval_every_steps=2")
    before = AutoModelForCausalLM.from_pretrained(tiny["model"]).get_input_embeddings().weight
    after_model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    after = after_model.get_input_embeddings().weight
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    sid_rows = tok.convert_tokens_to_ids(["<a_0>", "<b_1>"])
    assert (before[sid_rows] - after[sid_rows]).abs().max() > 0  # new SID rows are trainable
    assert torch.equal(before[:100], after[:100])  # the rest of the vocabulary is frozen
    assert not any("lora" in k for k in after_model.state_dict())  # merged on export


def test_early_stopping_keeps_best(tiny, tmp_path):
    # lr 0: the validation loss never improves after the first evaluation -> stop after `patience` more.
    result = _run(tiny, tmp_path, "sft.max_steps=20", "sft.lr=0.0", "sft.eval_every_steps=2",
                  "sft.save_every_steps=100", "sft.early_stopping_patience=2")
    assert result["early_stopped"] and result["steps"] == 6
    assert (tmp_path / "best" / "config.json").exists() and (tmp_path / "checkpoints").exists()
