"""SFT batching: tokens/s with sequence packing vs padded micro-batches, same samples, one run (CPU).

    python benchmarks/sft_packing.py [--samples 256] [--hidden 128] [--repeats 3]

Data: the real Industrial SFT mixture (METHOD.md 1.6; ../shared/data) tokenised by a tiny byte-level
BPE with the Industrial SID tokens, so the length distribution is realistic (a 512-token cutoff).
Model: a tiny Qwen2 (``tsrec.tiny``). Both modes run forward + backward + AdamW on exactly the same
samples: padded = ``micro_batch_size`` samples per row group, right-padded to the longest (multiple of
8), as the public collator; length-grouped = the same after sorting by length; packed = first-fit-decreasing rows of ``pack_len`` tokens. Tokens/s
counts real (non-padding) tokens. Appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsrec.config import load_config  # noqa: E402
from tsrec.sft.packing import batch_loss, collate, pack_samples, padding_share  # noqa: E402
from tsrec.sft.tasks import build_mixture, tokenize_samples  # noqa: E402

INDUSTRIAL = REPO.parent / "shared" / "data" / "amazon" / "Industrial_and_Scientific"
TEACHER = REPO.parent / "shared" / "data" / "tsrec" / "Industrial_and_Scientific" / "Industrial_and_Scientific.description_keywords.json"


def time_pass(model, opt, batches) -> float:
    """Seconds for one forward + backward + AdamW pass over ``batches``."""
    t0 = time.perf_counter()
    for b in batches:
        batch_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--pack-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared 2-core box: 2 OpenMP threads stall when the other core is busy
    if not INDUSTRIAL.exists():
        raise SystemExit(f"needs the Industrial release at {INDUSTRIAL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsrec.data.prepare import prepare_data
    from tsrec.sid.index import read_index
    from tsrec.tiny import save_tiny_sid_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"])
        prepare_data(cfg, tmp / "data")
        index = read_index(INDUSTRIAL / "index")
        mix = build_mixture(cfg, tmp / "data", INDUSTRIAL / "index", TEACHER)
        model_dir = save_tiny_sid_model(tmp / "model", index.all_tokens(), texts=[s.target for s in mix.train[:2000]],
                                        hidden_size=args.hidden)
        tok = AutoTokenizer.from_pretrained(model_dir)
        picked = random.Random(0).sample(mix.train, args.samples)
        samples = tokenize_samples(tok, picked, 512)
        padded = [collate([[s] for s in samples[i : i + args.micro]], tok.pad_token_id)
                  for i in range(0, len(samples), args.micro)]
        rows = pack_samples(samples, args.pack_len)
        # Rows per packed micro-batch: about the tokens of a padded micro-batch, so optimiser steps match.
        mean_len = sum(len(s.input_ids) for s in samples) / len(samples)
        per = max(1, round(args.micro * mean_len / args.pack_len))
        packed = [collate(rows[i : i + per], tok.pad_token_id) for i in range(0, len(rows), per)]
        by_len = sorted(samples, key=lambda s: len(s.input_ids))
        grouped = [collate([[s] for s in by_len[i : i + args.micro]], tok.pad_token_id)
                   for i in range(0, len(by_len), args.micro)]
        data = {"padded": padded, "grouped": grouped, "packed": packed}
        models = {m: AutoModelForCausalLM.from_pretrained(model_dir).train() for m in data}
        opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in models}
        for m in models:  # warm-up
            time_pass(models[m], opts[m], data[m][:1])
        # Interleaved repeats, best of each: the dev box is shared, so load changes between passes.
        best = {m: float("inf") for m in models}
        for _ in range(args.repeats):
            for m in models:
                best[m] = min(best[m], time_pass(models[m], opts[m], data[m]))
        tps = {m: sum(b.real_tokens for b in data[m]) / best[m] for m in models}
    lens = [len(s.input_ids) for s in samples]
    lines = [
        f"samples={len(samples)} real_tokens={sum(lens)} mean_len={sum(lens) / len(lens):.1f} max_len={max(lens)}",
        f"padded (random order, as the public collator): {len(padded)} micro-batches of {args.micro} rows, padding share "
        f"{padding_share(padded):.3f}, {best['padded']:.2f} s/pass, {tps['padded']:,.0f} tokens/s",
        f"length-grouped padded: padding share {padding_share(grouped):.3f}, {best['grouped']:.2f} s/pass, "
        f"{tps['grouped']:,.0f} tokens/s",
        f"packed: {len(rows)} rows of <= {args.pack_len} tokens in {len(packed)} micro-batches, padding share "
        f"{padding_share(packed):.3f}, {best['packed']:.2f} s/pass, {tps['packed']:,.0f} tokens/s",
        f"tokens/s vs padded: packed {tps['packed'] / tps['padded']:.2f}x, length-grouped {tps['grouped'] / tps['padded']:.2f}x",
    ]
    print("\n".join(lines))
    cmd = "python benchmarks/sft_packing.py " + " ".join(sys.argv[1:])
    section = (f"\n## SFT packing vs padded batches (benchmarks/sft_packing.py)\n\n2-core CPU dev box, no GPU, 2026-11-26. "
               f"Command: `{cmd.strip()}`. Tiny Qwen2 (hidden {args.hidden}, 2 layers), Industrial SFT mixture "
               f"(random {len(samples)} samples, tiny BPE tokenizer), forward + backward + AdamW, 1 thread, interleaved, best of {args.repeats}.\n\n"
               + "\n".join(f"- {ln}" for ln in lines) + "\n")
    with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(section)


if __name__ == "__main__":
    main()
