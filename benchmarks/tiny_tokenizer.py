"""The tiny BPE's prompt tokens: templates counted once (before) against weighted like the catalogue (now).

    python benchmarks/tiny_tokenizer.py [--run runs/industrial_cpu] [--batches 40] [--no-append]

Needs a run folder with data/, sids/ and semantics/ of a config with ``model.tiny_tokenizer_titles`` (the
Industrial CPU run: ``tsrec run --config configs/industrial_cpu.yaml``). Both tokenizers are trained by
``tsrec.tiny.build_tiny_tokenizer`` on the run's catalogue titles at the run's ``model.tiny_vocab_size``, with
``template_weight=1`` (the corpus of before: each template once beside the titles) and the number of titles (what
``tsrec model init`` passes now). Both get the SID tokens and a random tiny Qwen2 of the run's width and
depth (seed 42). The same SFT rows (the run's mixture, ``--batches`` micro-batches of the run's
``sft.micro_batch_size``, drawn with seed 0) are timed forward + backward + AdamW in this process on 1 torch
thread (what one Ray Train worker has on the 2-core box), the two tokenizers alternating batch by batch.

Prints and appends to benchmarks/RESULTS.md: tokens per row by task, median seconds per micro-batch, ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsrec.config import load_config  # noqa: E402
from tsrec.model import _catalogue_titles  # noqa: E402
from tsrec.sft.loop import SftLM  # noqa: E402
from tsrec.sft.packing import collate  # noqa: E402
from tsrec.sft.tasks import TASK_OF_TEMPLATE, build_mixture, tokenize_samples  # noqa: E402
from tsrec.sid.index import read_index  # noqa: E402
from tsrec.tiny import add_sid_tokens, build_tiny_model, build_tiny_tokenizer  # noqa: E402

WEIGHTS = {"templates once (before)": 1, "templates weighted (now)": 0}  # 0: as many as titles


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "industrial_cpu")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.run / "config.yaml")
    m, sft = cfg.model, cfg.sft
    sids = args.run / "sids"
    semantics = args.run / "semantics" / "description_keywords.json"
    titles = _catalogue_titles(sids)
    sid_tokens = read_index(sids).all_tokens()
    mix = build_mixture(cfg, args.run / "data", sids, semantics if sft.use_ts_align else None)
    rng = np.random.default_rng(0)
    rows = [mix.train[i] for i in rng.choice(len(mix.train), args.batches * sft.micro_batch_size, replace=False)]

    setups = {}
    for name, weight in WEIGHTS.items():
        tok = build_tiny_tokenizer(titles, vocab_size=m.tiny_vocab_size, template_weight=weight or len(titles))
        model = build_tiny_model(len(tok), hidden_size=m.tiny_hidden_size, layers=m.tiny_layers, seed=42)
        add_sid_tokens(tok, model, sid_tokens)
        lm = SftLM(model).train()
        samples = tokenize_samples(tok, rows, sft.cutoff_len, sft)
        pad = tok.pad_token_id
        batches = [collate([[s] for s in samples[i:i + sft.micro_batch_size]], pad)
                   for i in range(0, len(samples), sft.micro_batch_size)]
        per_task: dict[str, list[int]] = {}
        for r, s in zip(rows, samples):
            per_task.setdefault(TASK_OF_TEMPLATE.get(r.task, r.task), []).append(len(s.input_ids))
        setups[name] = {"lm": lm, "opt": torch.optim.AdamW(lm.parameters(), lr=sft.lr), "batches": batches,
                        "per_task": per_task, "pieces": len(tok), "times": []}

    for i in range(args.batches):  # alternate so that a drift in the box's speed hits both alike
        for s in setups.values():
            batch = s["batches"][i]
            t0 = time.perf_counter()
            total, _, _ = s["lm"](batch)
            (total / max(batch.weight_sum, 1e-12)).backward()
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=True)
            s["times"].append(time.perf_counter() - t0)

    tasks = sorted({t for s in setups.values() for t in s["per_task"]})
    head = "| tokenizer | pieces | " + " | ".join(f"tokens/row {t}" for t in tasks) + " | s per micro-batch (median) |"
    lines = [head, "|" + "---|" * (3 + len(tasks))]
    for name, s in setups.items():
        med = statistics.median(s["times"][2:])  # the first batches warm up the allocator
        s["median"] = med
        lines.append(f"| {name} | {s['pieces']:,} | "
                     + " | ".join(f"{statistics.mean(s['per_task'].get(t, [0])):.1f}" for t in tasks)
                     + f" | {med:.4f} |")
    before, now = (setups[n]["median"] for n in WEIGHTS)
    nb = statistics.mean(x for v in setups["templates once (before)"]["per_task"].values() for x in v)
    nn = statistics.mean(x for v in setups["templates weighted (now)"]["per_task"].values() for x in v)
    lines.append("")
    lines.append(f"- weighted / once: tokens per row {nn / nb:.2f}x, s per micro-batch {now / before:.2f}x "
                 f"(speed-up {before / now:.2f}x)")
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        load = os.getloadavg()[0]
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n## tiny_tokenizer: the tiny BPE with the prompt templates weighted (SFT forward + backward)\n\n"
                    f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()} {os.cpu_count()} CPUs, no GPU; "
                    f"torch {torch.__version__}, torch threads 1; 1-min load {load:.1f} at the end\n"
                    f"- command: `python benchmarks/tiny_tokenizer.py --run {args.run} --batches {args.batches}`\n"
                    f"- data: {len(rows)} rows of the run's SFT mixture, micro-batches of {sft.micro_batch_size}; "
                    f"hidden {m.tiny_hidden_size} x {m.tiny_layers} layers, {m.tiny_vocab_size}-piece BPE + "
                    f"{len(sid_tokens)} SID tokens\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
