"""RL loop (tsrec/rl/loop.py) in one process: DeepSpeed ZeRO-2 on CPU, tiny model, synthetic catalogue.

The tiny run (tests/sft/sft_synth.py) has 16 items, SIDs ``<a_i//4><b_i%4>``; G = 4 completions per prompt.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sft"))

from sft_synth import make_tiny_run  # noqa: E402
from tsrec.config import load_config  # noqa: E402
from tsrec.rl.core_algos import DegenerateRolloutError  # noqa: E402
from tsrec.train.metrics import read_metrics_csv  # noqa: E402

BASE = ["rl.group_size=4", "rl.prompts_per_step=8", "rl.prompts_per_micro=4", "rl.max_steps=4", "rl.lr=1e-3",
        "rl.warmup_ratio=0", "rl.eval_every_steps=2", "rl.save_every_steps=2", "rl.valid_sample_size=16",
        "rl.eval_beams=10", "rl.title_history_rows=16", "rl.beta=0.01", "rl.ref_sync_every_steps=2",
        "rl.precision=fp32", "rl.zero_stage=2", "eval.batch_size=8", "run.name=t"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("rl_tiny"))


def _train(tiny, out, *overrides):
    from tsrec.rl.loop import train_rl
    from tsrec.runtime import LocalContext

    cfg = load_config(None, [*BASE, *overrides])
    return train_rl(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(out))


@pytest.fixture(scope="module")
def ranking_semantic(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_loop")
    return out, _train(tiny, out, "rl.reward=ranking+semantic")


def test_one_process_loop_rows_rewards_and_export(ranking_semantic, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = ranking_semantic
    rows = read_metrics_csv(out / "logs" / "metrics.csv")
    # Row -1 is the SFT start, evaluated like every later row; the summary compares against it.
    assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3]
    start, rows = rows[0], rows[1:]
    assert start["eval/ndcg@10"] == pytest.approx(result["start_valid"]["ndcg@10"], abs=1e-9)
    assert result["start_valid_ndcg@10"] == start["eval/ndcg@10"]
    assert result["best_valid_ndcg@10"] == max(r["eval/ndcg@10"] for r in [start, *rows] if "eval/ndcg@10" in r)
    for r in rows:
        assert r["rollout/completion_len"] == 4  # 2 SID tokens + "\n" + EOS
        assert r["rollout/invalid_sids"] == 0
        assert 0 <= r["rollout/hit_share"] <= 1
        assert math.isfinite(r["rollout/reward_mean"]) and r["rollout/reward_std"] >= 0
        assert r["train/kl"] >= 0 and r["time/rollout_s"] > 0 and r["train/tokens_per_s"] > 0
    assert {"eval/ndcg@10", "eval/hr@3", "eval/ndcg@5"} <= set(rows[1]) and "eval/ndcg@10" in rows[3]
    assert rows[1].get("train/ref_synced") == 1
    assert (out / "logs" / "rl.png").exists() and any((out / "logs" / "tensorboard").iterdir())
    assert result["start_valid"] is not None and result["best_valid_ndcg@10"] >= result["start_valid"]["ndcg@10"]
    for name in ("best", "final"):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        assert "<a_0>" in tok.get_vocab() and model.config.vocab_size >= len(tok)


def test_final_export_reproduces_the_last_valid_metric(ranking_semantic, tiny):
    """The exported final folder, decoded like the loop's validation, gives the same NDCG@10."""
    from tsrec.decode.beam import constrained_beam_search, left_pad
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import load_model
    from tsrec.train.ranking import valid_ranking_rows
    from tsrec.sid.index import read_index

    out, result = ranking_semantic
    cfg = load_config(None, BASE)
    model, tok = load_model(out / "final", "float32", "cpu")
    index = read_index(tiny["sids"])
    cons = SidConstraints.from_index(index, tok)
    valid = valid_ranking_rows(cfg, tiny["data"], index, tok, cfg.rl.valid_sample_size)
    ndcg = 0.0
    for i in range(0, len(valid), 8):
        chunk = valid[i : i + 8]
        ids, mask = left_pad([r["ids"] for r in chunk], tok.eos_token_id)
        res = constrained_beam_search(model, ids, mask, cons, 10)
        for r, row in zip(chunk, res.sid_token_ids.tolist()):
            if r["target"] in row:
                ndcg += 1 / math.log2(row.index(r["target"]) + 2)
    assert abs(ndcg / len(valid) - result["final_valid"]["ndcg@10"]) < 1e-6


def test_resume_from_checkpoint_gives_the_same_steps(ranking_semantic, tiny, tmp_path):
    """A run restarted on the step-1 checkpoint of an uninterrupted run (reference synced at step 1, so
    it must come from the checkpoint) computes steps 2-3 only, with the same losses and KL (fp32)."""
    import shutil

    full, _ = ranking_semantic
    src = full / "checkpoints" / "step_1"
    assert (src / ".complete").exists() and (src / "reference" / "weights.pt").exists()
    shutil.copytree(src, tmp_path / "checkpoints" / "step_1")
    _train(tiny, tmp_path, "rl.reward=ranking+semantic")
    base = read_metrics_csv(full / "logs" / "metrics.csv")
    rows = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3]  # the start row came back with the checkpoint
    assert {r["attempt/start_step"] for r in rows if r["step"] >= 2} == {2}  # steps 0-1 were not rerun
    for a, b in zip(base, rows):
        for k in ("train/loss", "train/kl", "rollout/reward_mean", "eval/ndcg@10"):
            if k in a:
                assert abs(a[k] - b[k]) < 1e-4, (a["step"], k, a[k], b[k])


def test_degenerate_rollouts_stop_the_run(tiny, tmp_path):
    """G = 2 on a prompt set where rewards never vary for 1 step: the guard raises a named error."""
    with pytest.raises(DegenerateRolloutError, match="all rewards equal"):
        _train(tiny, tmp_path, "rl.guard_equal_reward_steps=1", "rl.rank_weight=0", "rl.rule_weight=0")


def test_prompts_per_step_must_split_over_micro_batches(tiny, tmp_path):
    from tsrec.config import ConfigError

    with pytest.raises(ConfigError, match="prompts_per_step"):
        _train(tiny, tmp_path, "rl.prompts_per_step=6")


def test_valid_progress_compares_the_start_with_the_best():
    """Start = the step -1 row; steps are counted as RL steps done; ties keep the earliest best."""
    from tsrec.rl.logs import progress_line, valid_progress

    rows = [{"step": -1, "eval/ndcg@10": 0.20}, {"step": 0, "train/loss": 1.0}, {"step": 1, "eval/ndcg@10": 0.19},
            {"step": 3, "eval/ndcg@10": 0.25}, {"step": 5, "eval/ndcg@10": 0.25}]
    p = valid_progress(rows)
    assert p["start_valid_ndcg@10"] == 0.20 and p["best_valid_ndcg@10"] == 0.25
    assert p["best_after_steps"] == 4 and p["first_gain_after_steps"] == 4
    assert p["valid_ndcg@10_gain"] == pytest.approx(0.05)
    assert p["valid_ndcg@10_by_steps"] == {0: 0.20, 2: 0.19, 4: 0.25, 6: 0.25}
    assert progress_line(p) == "valid NDCG@10 start 0.2000 -> best 0.2500 after 4 steps (+0.0500; first gain after 4 steps)"
    never = valid_progress(rows[:3])
    assert never["best_after_steps"] == 0 and never["first_gain_after_steps"] is None
    assert "never above the start" in progress_line(never)


def test_sampled_rollouts_train_and_resume_to_the_same_steps(ranking_semantic, tiny, tmp_path):
    """rl.rollout=sample: draws seeded per (seed, step, rank, micro-batch), so a run restarted on the step-1
    checkpoint draws the same completions and computes the same losses as the uninterrupted run."""
    import shutil

    full = tmp_path / "full"
    _train(tiny, full, "rl.reward=ranking+semantic", "rl.rollout=sample", "rl.temperature=1.5")
    base = read_metrics_csv(full / "logs" / "metrics.csv")
    beam = read_metrics_csv(ranking_semantic[0] / "logs" / "metrics.csv")
    assert all(r["rollout/invalid_sids"] == 0 and r["rollout/completion_len"] == 4 for r in base if r["step"] >= 0)
    # Not the beam rollouts: the same start, prompts and reward as the beam run, but at step 0 the G = 4 draws
    # (T = 1.5) are other completions than the 4 best SIDs, so the rewards and the loss differ.
    assert base[0]["eval/ndcg@10"] == beam[0]["eval/ndcg@10"] and base[1]["step"] == beam[1]["step"] == 0
    assert base[1]["rollout/reward_mean"] != beam[1]["rollout/reward_mean"] and base[1]["train/loss"] != beam[1]["train/loss"]
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_1", resumed / "checkpoints" / "step_1")
    _train(tiny, resumed, "rl.reward=ranking+semantic", "rl.rollout=sample", "rl.temperature=1.5")
    rows = read_metrics_csv(resumed / "logs" / "metrics.csv")
    assert {r["attempt/start_step"] for r in rows if r["step"] >= 2} == {2}
    for a, b in zip(base, rows):
        for k in ("train/loss", "train/kl", "rollout/reward_mean", "rollout/hit_share", "eval/ndcg@10"):
            if k in a:
                assert abs(a[k] - b[k]) < 1e-4, (a["step"], k, a[k], b[k])


def test_shared_prompt_forward_gives_the_steps_of_the_full_forward(ranking_semantic, tiny, tmp_path, capfd):
    """The default update runs each prompt once for its group of G rows (rl.shared_prompt_forward): every
    logged loss, KL, reward and valid metric equals a run that puts every row through the decoder (fp32)."""
    full, _ = ranking_semantic
    _train(tiny, tmp_path, "rl.reward=ranking+semantic", "rl.shared_prompt_forward=false")
    assert "shared_prompt_forward=False" in capfd.readouterr().out
    shared = read_metrics_csv(full / "logs" / "metrics.csv")
    plain = read_metrics_csv(tmp_path / "logs" / "metrics.csv")
    assert [r["step"] for r in plain] == [r["step"] for r in shared] == [-1, 0, 1, 2, 3]
    for a, b in zip(shared, plain):
        for k in ("train/loss", "train/kl", "rollout/reward_mean", "eval/ndcg@10"):
            if k in a or k in b:
                assert abs(a[k] - b[k]) < 1e-4, (a["step"], k, a[k], b[k])
    assert any(abs(r["train/loss"]) > 1e-6 for r in shared if r["step"] >= 0)  # the steps did update


def test_the_default_run_used_the_shared_prompt_forward(tiny, tmp_path, capfd):
    _train(tiny, tmp_path, "rl.max_steps=1", "rl.eval_every_steps=1", "rl.save_every_steps=1")
    assert "shared_prompt_forward=True" in capfd.readouterr().out


def test_shared_prompt_forward_keeps_the_run_identity(tiny):
    """A speed switch with the same numbers: a run started with it on resumes with it off (and back)."""
    from tsrec.rl.loop import rl_identity

    inputs = {"model": tiny["model"], "data": tiny["data"], "sids": tiny["sids"], "semantics": None}
    on, off = (rl_identity(load_config(None, [*BASE, f"rl.shared_prompt_forward={v}"]), inputs, 2) for v in ("true", "false"))
    assert on == off
    assert rl_identity(load_config(None, [*BASE, "rl.lr=2e-3"]), inputs, 2) != on  # a key that changes the steps does


def test_embedding_similarity_runs_end_to_end(tiny, tmp_path):
    """rl.semantic_similarity=embedding: the teacher descriptions are embedded by the SID stage's encoder
    (all-MiniLM-L6-v2 by default) and the run trains on them. The tiny teacher file gives every token its own
    keyword, so Jaccard credits exact tokens only; the embedded descriptions ("items like glue" ...) are
    similar, so the table has positive off-diagonal entries (a loop that built Jaccard instead fails here)."""
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import load_model
    from tsrec.rl.loop import _semantic_tables
    from tsrec.sid.index import read_index

    over = ["rl.reward=ranking+semantic", "rl.semantic_similarity=embedding"]
    cfg = load_config(None, [*BASE, *over])
    _, tok = load_model(tiny["model"], "float32", "cpu")
    cons = SidConstraints.from_index(read_index(tiny["sids"]), tok)
    sim, _ = _semantic_tables(cfg, tiny["semantics"], cons, tok, "cpu")
    assert sim.method == "embedding"
    m = sim.matrices[0]
    assert float(m[~torch.eye(m.shape[0], dtype=torch.bool)].min()) > 0.1, m
    result = _train(tiny, tmp_path, *over, "rl.max_steps=2")
    rows = [r for r in read_metrics_csv(tmp_path / "logs" / "metrics.csv") if r["step"] >= 0]
    assert result["steps"] == 2 and all(math.isfinite(r["train/loss"]) for r in rows)
    assert all(r["rollout/semantic_mean"] > 0 for r in rows)


@pytest.mark.parametrize("overrides, match", [
    (["rl.reward=ranking+semantic", "rl.semantic_similarity=embedding", "embed.encoder=/nonexistent/encoder"],
     "semantic_similarity=embedding.*not a Hugging Face encoder folder"),
    (["rl.prompts_per_step=6", "resources.rl.workers=2"], "prompts_per_step"),
    (["rl.rollout=sample", "rl.temperature=0"], "temperature"),
    (["rl.updates_per_rollout=2", "rl.clip_eps=0"], "clip_eps"),
    (["rl.semantic_weight=-1"], "semantic_weight"),
])
def test_tsrec_rl_refuses_configs_before_any_worker_starts(tiny, tmp_path, monkeypatch, overrides, match):
    """run_rl (what `tsrec rl` calls) raises ConfigError before it launches Ray Train (launch is replaced by a
    function that fails the test if it is reached)."""
    from tsrec.config import ConfigError
    from tsrec.orchestration import rl as orch

    def no_launch(*a, **k):
        raise AssertionError("Ray Train was started")

    monkeypatch.setattr(orch, "launch", no_launch)
    cfg = load_config(None, [*BASE, *overrides])
    with pytest.raises(ConfigError, match=match):
        orch.run_rl(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], tmp_path)
