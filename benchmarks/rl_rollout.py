"""Benchmark: RL rollouts with the in-worker tensor decoder vs transformers generate (the public path).

In ONE process, on the same tiny SID model (tests/sft/sft_synth.py catalogue, ``--items`` items) and the
same left-padded RL prompts (``tsrec.rl.data``):

1. ``tsrec.decode.rollout.generate_rollouts`` (constrained beam search, G distinct SIDs + "\\n" + EOS), and
2. ``model.generate`` with ``num_beams = num_return_sequences = G`` and a Python-trie
   ``prefix_allowed_tokens_fn`` over SID + "\\n" + EOS (``tsrec.decode.reference.hf_prefix_beam_search``):
   MiniOneRec's rollout.

It reports prompts/s of both and whether their G-lists agree, then runs ``tsrec.rl.loop.train_rl`` for
``--steps`` steps (1 process, ZeRO-2, CPU or GPU) twice: with every rollout row through the decoder in the
update (``rl.shared_prompt_forward=false``, the public path) and with each prompt once per group (the
default), and reports the update seconds per step of both, their ratio and the share of a step spent in
rollout vs update (reference forward included in update). Appends a section to ``benchmarks/RESULTS.md``.

    python benchmarks/rl_rollout.py                  # CPU: G 16, 64 items, 32 prompts, 3 RL steps
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "sft"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4, help="prompts per decoder call (rl.prompts_per_micro)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()

    from sft_synth import make_tiny_run

    from tsrec.config import load_config
    from tsrec.decode.beam import left_pad
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.evaluate import upstream_suffix_ids
    from tsrec.decode.reference import hf_prefix_beam_search
    from tsrec.decode.rollout import generate_rollouts
    from tsrec.rl.data import build_rl_data, tokenize_rl
    from tsrec.rl.loop import train_rl
    from tsrec.runtime import LocalContext
    from tsrec.sid.index import read_index
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tsrec-rl-bench-") as d:
        run = make_tiny_run(Path(d), n_items=a.items, n_train=max(4 * a.prompts, 128), hidden_size=a.hidden)
        overrides = [f"rl.group_size={a.group}", f"rl.prompts_per_step={a.prompts}", f"rl.prompts_per_micro={a.batch}",
                     f"rl.max_steps={a.steps}", "rl.eval_every_steps=1000", "rl.save_every_steps=1000",
                     "rl.valid_sample_size=8", "rl.title_history_rows=32", "rl.zero_stage=2", "rl.precision=fp32"]
        cfg = load_config(None, overrides)
        tok = AutoTokenizer.from_pretrained(run["model"])
        model = AutoModelForCausalLM.from_pretrained(run["model"]).eval()
        cons = SidConstraints.from_index(read_index(run["sids"]), tok)
        suffix = upstream_suffix_ids(tok, cons)
        samples = tokenize_rl(tok, build_rl_data(cfg, run["data"], run["sids"]).train[: a.prompts])
        batches = [left_pad([s.prompt_ids for s in samples[i : i + a.batch]], tok.eos_token_id)
                   for i in range(0, len(samples), a.batch)]
        generate_rollouts(model, *batches[0], cons, a.group, suffix)  # warm-up
        t = time.perf_counter()
        ours = [generate_rollouts(model, ids, mask, cons, a.group, suffix) for ids, mask in batches]
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        ref = [hf_prefix_beam_search(model, ids, mask, cons, a.group, tok.eos_token_id, suffix_ids=suffix)[0]
               for ids, mask in batches]
        t_hf = time.perf_counter() - t
        same = 0
        for ro, sids in zip(ours, ref):
            mine = [cons.sids[i] for i in ro.sid_index.tolist()]
            for b in range(len(sids)):
                same += sorted(mine[b * a.group : (b + 1) * a.group]) == sorted(sids[b])
        # An RL step in the loop, every row in full vs each prompt once per group: update time, rollout share.
        from tsrec.train.metrics import read_metrics_csv

        timing = {}
        for shared in (False, True):
            result_dir = Path(d) / f"rl-{shared}"
            run_cfg = load_config(None, [*overrides, f"rl.shared_prompt_forward={str(shared).lower()}"])
            train_rl(run_cfg, run["model"], run["data"], run["sids"], run["semantics"], LocalContext(result_dir))
            # step -1 is the SFT start's valid evaluation (no rollout, no update): not a step
            rows = [r for r in read_metrics_csv(result_dir / "logs" / "metrics.csv") if r["step"] >= 0]
            timing[shared] = {"update": sum(r["time/update_s"] for r in rows) / len(rows),
                              "rollout_share": sum(r["time/rollout_s"] for r in rows) / sum(r["time/step_s"] for r in rows),
                              "kl": [r["train/kl"] for r in rows], "loss": [r["train/loss"] for r in rows]}
        full, grouped = timing[False], timing[True]
    n = len(samples)
    lines = [
        f"## rl_rollout: in-worker constrained beam search vs generate + prefix_allowed_tokens_fn ({'cuda' if torch.cuda.is_available() else 'cpu'})",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()} {os.cpu_count()} CPUs"
        f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', no GPU'}; torch {torch.__version__}, "
        f"python {platform.python_version()}, torch threads {torch.get_num_threads()}",
        f"- command: `python benchmarks/rl_rollout.py --items {a.items} --group {a.group} --prompts {a.prompts} "
        f"--batch {a.batch} --steps {a.steps} --hidden {a.hidden}`",
        f"- model: tiny Qwen2 (hidden {a.hidden}, 2 layers), fp32; catalogue {cons.num_sids} SIDs of {cons.num_levels} "
        f"levels; G = num_beams = num_return_sequences = {a.group}; completion = SID + newline + EOS",
        f"- transformers generate + prefix_allowed_tokens_fn (Python trie): {n / t_hf:.2f} prompts/s",
        f"- tsrec generate_rollouts (tensor constrained beam search):     {n / t_ours:.2f} prompts/s",
        f"- speed-up: {t_hf / t_ours:.1f}x; same G-set of SIDs on {same}/{n} prompts",
        f"- RL update per step ({a.prompts} prompts x G {a.group}, 1 process, ZeRO-2, mean of {len(rows)} steps; policy + "
        f"reference forward, backward, step): every row in full {full['update']:.2f} s, each prompt once per group "
        f"{grouped['update']:.2f} s: {full['update'] / grouped['update']:.1f}x; largest difference of the two runs' per-step "
        f"loss {max(abs(x - y) for x, y in zip(full['loss'], grouped['loss'])):.1e} and KL "
        f"{max(abs(x - y) for x, y in zip(full['kl'], grouped['kl'])):.1e} (KL {max(grouped['kl']):.1e})",
        f"- rollout share of the step time: {full['rollout_share']:.0%} with every row in full, "
        f"{grouped['rollout_share']:.0%} with the shared prompt forward (the rest is the update)",
        f"- 1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (other jobs share the machine)",
        "",
    ]
    print("\n".join(lines))
    if not a.no_write:
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
