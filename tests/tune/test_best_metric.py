"""sft.best_metric (set by `tsrec tune` from tune.metric): the SFT loop keeps best/ at the steps where that
metric improved, not where the valid loss did. One process, DeepSpeed ZeRO-2 on CPU, the tiny SFT catalogue."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sft"))

from sft_synth import make_tiny_run  # noqa: E402
from tsrec.config import ConfigError, load_config  # noqa: E402
from tsrec.runtime import LocalContext  # noqa: E402
from tsrec.sft.loop import train_sft  # noqa: E402

BASE = ["sft.global_batch_size=8", "sft.micro_batch_size=8", "sft.warmup_steps=0", "sft.zero_stage=2",
        "sft.eval_every_steps=1", "sft.save_every_steps=100", "sft.early_stopping_patience=0", "sft.max_steps=6",
        "sft.valid_ranking_beams=5", "sft.precision=fp32", "sft.packing=false", "sft.max_eval_samples=16"]


class ExportLog(LocalContext):
    """LocalContext that also remembers the step of every best/ export (the loop exports, then reports)."""

    def __init__(self, root):
        super().__init__(root)
        self.best_exports: list[int] = []

    def save_artifact(self, local_dir: Path, name: str) -> None:
        super().save_artifact(local_dir, name)
        if name == "best":
            self.best_exports.append(len(self.metrics))  # reports so far = the step being evaluated


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("best_metric"))


def _improvements(rows, key, sign):
    best, steps = float("inf"), []
    for r in rows:
        if key in r and sign * r[key] < best:
            best, steps = sign * r[key], [*steps, r["step"]]
    return steps


def test_best_export_follows_the_ranking_metric(tiny, tmp_path):
    # lr 0.03 at one step per evaluation: the loss falls at (almost) every step while NDCG@5 on 16 rows moves in
    # steps, so "where the loss improved" and "where NDCG improved" differ.
    cfg = load_config(None, [*BASE, "sft.lr=3e-2", "sft.valid_ranking_sample=16", "sft.best_metric=ndcg@5"])
    ctx = ExportLog(tmp_path)
    train_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], ctx)
    evals = [r for r in ctx.metrics if "eval/loss" in r]
    by_ndcg, by_loss = _improvements(evals, "eval/ndcg@5", -1), _improvements(evals, "eval/loss", 1)
    assert by_ndcg != by_loss, evals  # else this run could not tell the two rules apart
    assert ctx.best_exports == by_ndcg, (ctx.best_exports, evals)


def test_unknown_best_metric_is_a_named_error(tiny, tmp_path):
    cfg = load_config(None, [*BASE, "sft.best_metric=ndcg@10"])  # the probe is off (valid_ranking_sample 0)
    with pytest.raises(ConfigError, match=r"sft.best_metric='ndcg@10': expected 'loss' or one of"):
        train_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(tmp_path))


@pytest.mark.parametrize("overrides", [["sft.best_metric=ndcg@10"],  # the probe is off
                                       ["sft.valid_ranking_sample=16", "sft.best_metric=ndcg@10"]])  # beams 5
def test_best_metric_refused_before_ray_starts(tiny, tmp_path, overrides, monkeypatch):
    # `tsrec run` and `tsrec sft` check sft.best_metric against the probe's cut-offs before Ray Train starts:
    # a Ray start here fails the test instead of reaching the workers' own check.
    import tsrec.orchestration.cluster as cluster
    import tsrec.orchestration.train as train
    from tsrec.orchestration.pipeline import run_pipeline
    from tsrec.orchestration.train import run_sft

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the config was checked")

    monkeypatch.setattr(cluster, "ensure_ray", no_ray)
    monkeypatch.setattr(train, "ensure_ray", no_ray)
    cfg = load_config(None, [*BASE, *overrides, f"run.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"sft.best_metric='ndcg@10': expected one of \['loss'"):
        run_pipeline(cfg)
    with pytest.raises(ConfigError, match=r"sft.valid_ranking_beams=5"):
        run_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], tmp_path / "sft")
