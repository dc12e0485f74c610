"""RL that must learn the right thing (issue 22): a learning test on fixed prompts, log-prob parity between
the rollout and the update, and loop runs of the PPO path and bf16.

The learning test guards the loop around the numerics (``tsrec/rl/loop.py``): breaks tried on purpose and
caught here are a flipped advantage sign (``seq_adv = -ca.group_advantages(...)``: top-1 share falls to 0)
and scoring each sample against its neighbour's target (``ca.sid_hits(comp, target.roll(1, 0))``: top-1
share stays at the start's 1/8). Tiny run of tests/sft/sft_synth.py with 8 train rows.
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
from tsrec.train.metrics import read_metrics_csv  # noqa: E402

STEPS = 30
# One task, 8 fixed prompts, all of them every step (one micro-batch); no KL, constant LR, no reference.
LEARN = ["rl.tasks=[sid_history]", "rl.group_size=4", "rl.prompts_per_step=8", "rl.prompts_per_micro=8",
         f"rl.max_steps={STEPS}", "rl.lr=1e-2", "rl.warmup_ratio=0", "rl.scheduler=constant",
         f"rl.eval_every_steps={STEPS}", f"rl.save_every_steps={STEPS}", "rl.valid_sample_size=4", "rl.eval_beams=4",
         "rl.beta=0", "rl.guard_equal_reward_steps=0", "rl.precision=fp32", "rl.zero_stage=0", "eval.batch_size=8",
         "run.name=t"]
LOOP = ["rl.group_size=4", "rl.prompts_per_step=8", "rl.prompts_per_micro=4", "rl.max_steps=2", "rl.lr=1e-3",
        "rl.warmup_ratio=0", "rl.eval_every_steps=2", "rl.save_every_steps=2", "rl.valid_sample_size=8",
        "rl.eval_beams=4", "rl.title_history_rows=16", "rl.beta=0.01", "rl.zero_stage=2", "eval.batch_size=8",
        "run.name=t"]


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("rl_fixed"), n_train=8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("rl_learn_tiny"))


def _train(tiny, out, base, *overrides):
    from tsrec.rl.loop import train_rl
    from tsrec.runtime import LocalContext

    cfg = load_config(None, [*base, *overrides])
    return train_rl(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(out))


def _prompts(cfg, tiny, tok):
    from tsrec.rl.data import build_rl_data, tokenize_rl

    return tokenize_rl(tok, build_rl_data(cfg, tiny["data"], tiny["sids"]).train)


def _top_shares(model_dir, tiny, cfg) -> tuple[float, float]:
    """Share of the train prompts whose top beam is their target, and whose G beams contain it."""
    from tsrec.decode.beam import constrained_beam_search, left_pad
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import load_model
    from tsrec.sid.index import read_index

    model, tok = load_model(model_dir, "float32", "cpu")
    data = _prompts(cfg, tiny, tok)
    cons = SidConstraints.from_index(read_index(tiny["sids"]), tok)
    ids, mask = left_pad([s.prompt_ids for s in data], tok.eos_token_id)
    out = constrained_beam_search(model, ids, mask, cons, cfg.rl.group_size)
    beams = out.sid_token_ids.tolist()
    top1 = sum(b[0] == s.target_ids for b, s in zip(beams, data)) / len(data)
    in_group = sum(s.target_ids in b for b, s in zip(beams, data)) / len(data)
    return top1, in_group


def test_rl_learns_the_targets_of_fixed_prompts(fixed, tmp_path):
    """30 GRPO steps on 8 fixed prompts raise the share whose top beam is the target from 1/8 to >= 3/8,
    measured with the plain beam search on the SFT start and on the exported final model (not with the
    loop's own statistics, so a wrong statistic cannot hide a wrong update). ~30 s on 2 cores."""
    cfg = load_config(None, LEARN)
    _train(fixed, tmp_path, LEARN)
    start_top1, start_in = _top_shares(fixed["model"], fixed, cfg)
    final_top1, final_in = _top_shares(tmp_path / "final", fixed, cfg)
    print(f"top-1 share {start_top1:.3f} -> {final_top1:.3f}; target in group {start_in:.3f} -> {final_in:.3f}")
    assert final_top1 >= start_top1 + 0.25, (start_top1, final_top1)
    assert final_in >= start_in, (start_in, final_in)
    rows = [r for r in read_metrics_csv(tmp_path / "logs" / "metrics.csv") if r["step"] >= 0]
    assert len(rows) == STEPS
    # The loop's own figure agrees in direction: more groups contain the target at the end than at the start.
    assert rows[-1]["rollout/hit_share"] > rows[0]["rollout/hit_share"]


@pytest.mark.parametrize("score_suffix", [True, False])
def test_step0_policy_logprobs_equal_the_rollout_scores(tiny, score_suffix):
    """What the update computes for the rollout's completions before any step (``completion_logprobs``, the
    shared-prompt and the full forward) equals the beam search's scores token by token, suffix included
    when the rollout scored it (``eval.score_suffix``), and the rows are in each group's score order."""
    from tsrec.decode.beam import left_pad
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import load_model, upstream_suffix_ids
    from tsrec.rl.loop import _rollout, completion_logprobs
    from tsrec.sid.index import read_index

    cfg = load_config(None, [*LOOP, "rl.tasks=[sid_history,title]"])
    model, tok = load_model(tiny["model"], "float32", "cpu")
    data = _prompts(cfg, tiny, tok)[:6]
    cons = SidConstraints.from_index(read_index(tiny["sids"]), tok)
    suffix = upstream_suffix_ids(tok, cons)
    G, L, C = 4, cons.num_levels, cons.num_levels + len(suffix)
    ids, mask = left_pad([s.prompt_ids for s in data], tok.eos_token_id)
    ro = _rollout(cfg.rl, model, ids, mask, cons, G, suffix, (0, 0, 0, 0), score_suffix)
    with torch.no_grad():
        for shared in (G, 1):
            lp = completion_logprobs(model, ro.sequences, ro.attention_mask, C, shared)
            assert lp.shape == (len(data) * G, C)
            scored = C if score_suffix else L
            torch.testing.assert_close(lp[:, :scored], ro.token_logprobs[:, :scored], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lp[:, :scored].sum(-1), ro.scores, atol=1e-5, rtol=1e-5)
    assert torch.isnan(ro.token_logprobs[:, L:]).all() != score_suffix
    by_group = ro.scores.view(len(data), G)
    assert (by_group[:, :-1] >= by_group[:, 1:]).all()  # rank 0 first: the rank penalty's order
    assert ro.beam_ranks.view(len(data), G).tolist() == [list(range(G))] * len(data)


def test_ppo_path_clips_the_second_update(tiny, tmp_path):
    """rl.updates_per_rollout=2: the second update of a rollout sees ratios != 1 against the rollout
    policy's log-probs, so with a tiny clip range some tokens are clipped (a loop that passed no old
    log-probs, ratio 1 on every update, clips none)."""
    _train(tiny, tmp_path, LOOP, "rl.precision=fp32", "rl.updates_per_rollout=2", "rl.clip_eps=1e-4")
    rows = [r for r in read_metrics_csv(tmp_path / "logs" / "metrics.csv") if r["step"] >= 0]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["train/loss"]) and r["train/kl"] >= 0 for r in rows)
    assert all(0 < r["train/clip_frac"] <= 0.5 for r in rows), [r["train/clip_frac"] for r in rows]
    assert "eval/ndcg@10" in rows[-1]


def test_bf16_loop_runs_and_starts_at_zero_kl(tiny, tmp_path):
    """rl.precision=bf16 (ZeRO-2, CPU): the steps run with finite numbers, the first update's KL is ~0 (the
    policy and the bf16 reference are the same model then) and the exported model loads."""
    from transformers import AutoModelForCausalLM

    _train(tiny, tmp_path, LOOP, "rl.precision=bf16", "rl.reward=ranking+semantic")
    rows = [r for r in read_metrics_csv(tmp_path / "logs" / "metrics.csv") if r["step"] >= 0]
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert math.isfinite(r["train/loss"]) and math.isfinite(r["rollout/reward_mean"])
        assert r["rollout/completion_len"] == 4 and r["rollout/invalid_sids"] == 0
    # Same weights, same bf16 forwards: exactly 0 (a reference kept in fp32 beside a bf16 policy gives ~2e-7).
    assert rows[0]["train/kl"] < 1e-8, rows[0]["train/kl"]
    assert math.isfinite(rows[-1]["eval/ndcg@10"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "final")
