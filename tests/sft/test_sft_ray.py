"""ACCEPTANCE: SFT on Ray Train, 2 CPU workers, DeepSpeed ZeRO-2 and ZeRO-3; a killed worker resumes exactly.

Three ``TorchTrainer.fit`` calls in all: the ZeRO-2 run doubles as the uninterrupted baseline of the
fault test, which kills the last worker once after step 6 (checkpoint after step 3) and must end on the
same losses (fp32, same seed), with every step after 3 computed by the restarted attempt (``attempt/*``
columns), so a restart that ignored the checkpoint fails it.
"""

from __future__ import annotations

import pytest
import torch

from sft_synth import assert_resumed_after, make_tiny_run
from shared_data import assert_greedy_generate
from tsrec.config import load_config
from tsrec.train.metrics import read_metrics_csv

pytestmark = pytest.mark.ray

BASE = ["sft.global_batch_size=8", "sft.micro_batch_size=2", "sft.lr=3e-3", "sft.warmup_steps=2", "sft.max_steps=12",
        "sft.eval_every_steps=4", "sft.save_every_steps=4", "sft.precision=fp32", "sft.max_failures=2",
        "resources.sft.workers=2", "resources.sft.cpus_per_worker=1", "run.name=t"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("sft_ray_tiny"))


def _run(tiny, out, *overrides):
    from tsrec.orchestration.train import run_sft

    cfg = load_config(None, [*BASE, *overrides])
    return run_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], out)


@pytest.fixture(scope="module")
def zero2(ray_cluster, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_zero2")
    return out, _run(tiny, out, "sft.zero_stage=2")


def _check_run(out, result, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsrec.sft.packing import batch_loss, collate
    from tsrec.sft.tasks import build_mixture, tokenize_samples

    assert result["final_val_loss"] < 0.8 * result["first_val_loss"], result
    rows = read_metrics_csv(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(12))
    assert all(0 <= r["train/padding_frac"] < 1 for r in rows)
    assert (out / "loss.png").exists() and (out / "manifest.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert_greedy_generate(model, tok, "The user", 4)
    # The exported weights (gathered from shards) reproduce the best validation loss.
    mix = build_mixture(load_config(None, BASE), tiny["data"], tiny["sids"], tiny["semantics"])
    valid = tokenize_samples(tok, mix.valid, 512)
    with torch.no_grad():
        val = batch_loss(model, collate([[s] for s in valid], tok.pad_token_id)).item()
    assert abs(val - result["best_val_loss"]) < 1e-4
    return rows


def test_ray_train_zero2_two_workers(zero2, tiny):
    out, result = zero2
    _check_run(out, result, tiny)


def test_ray_train_zero3_two_workers(ray_cluster, tiny, tmp_path):
    result = _run(tiny, tmp_path, "sft.zero_stage=3", "sft.packing=false")  # also covers length-grouped batches
    _check_run(tmp_path, result, tiny)


def test_killed_worker_resumes_to_the_same_loss(zero2, tiny, tmp_path):
    base_out, base = zero2
    marker = tmp_path / "killed-once"
    result = _run(tiny, tmp_path / "out", "sft.zero_stage=2", "sft.fail_at_step=6", f"sft.fail_marker={marker}")
    assert marker.exists()  # the first attempt really died
    base_rows = read_metrics_csv(base_out / "metrics.csv")
    rows = read_metrics_csv(tmp_path / "out" / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(12))
    assert_resumed_after(rows, 3)  # the restarted group began after the step-3 checkpoint, not at 0
    assert abs(rows[-1]["train/loss"] - base_rows[-1]["train/loss"]) < 1e-4
    assert abs(result["final_val_loss"] - base["final_val_loss"]) < 1e-4
    for a, b in zip(base_rows, rows):
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-4
