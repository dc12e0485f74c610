"""Benchmark: tensor constrained beam search vs transformers' beam search + prefix_allowed_tokens_fn.

Both decoders run in ONE process on the same random Qwen2 (built from a config, no weights
downloaded), the same left-padded prompts and the same width; the script reports users/s of each,
the speed-up, and whether the top-K SID lists are identical, then appends a section to
``benchmarks/RESULTS.md``.

Lists that differ are classified per prompt (:func:`tsrec.decode.reference.compare_topk`): a
**near-tie** when the swapped SIDs' scores differ by less than ``--tie-tol`` (two correct decoders
may order candidates that tie up to float rounding differently; at 50 beams one run had a swap with
a score gap of 7.6e-6), a **real mismatch** otherwise. The exit status is 1 only for real mismatches.

The catalogue is the Industrial index (3,670 distinct SIDs, 560 tokens); SID tokens get the ids a
Qwen2.5 tokenizer gives them (151,665 onward), so the full-vocabulary log-softmax has the real width.

    python benchmarks/decode.py                                   # CPU: hidden 256, 4 layers
    python benchmarks/decode.py --preset qwen2.5-1.5b --device cuda --dtype bfloat16 --batches 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tsrec.decode.beam import constrained_beam_search, left_pad  # noqa: E402
from tsrec.decode.constraints import SidConstraints  # noqa: E402
from tsrec.decode.reference import compare_topk, hf_prefix_beam_search  # noqa: E402
from tsrec.sid.index import read_index  # noqa: E402

INDEX = REPO.parent / "shared/data/amazon/Industrial_and_Scientific/index/Industrial_and_Scientific.index.json"
PRESETS = {
    "small": dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
}
FIRST_SID_ID = 151_665  # Qwen2.5 tokenizer length: added SID tokens start here (METHOD.md 1.3)


def build_model(args, vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    p = PRESETS[args.preset]
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(cfg).to(dtype=getattr(torch, args.dtype)).to(args.device).eval()
    return model


def make_prompts(args, n: int, gen: torch.Generator) -> list[list[int]]:
    """Random non-SID token ids, lengths prompt_len +- 20 (left padding inside a batch)."""
    lens = torch.randint(args.prompt_len - 20, args.prompt_len + 21, (n,), generator=gen)
    return [torch.randint(0, FIRST_SID_ID, (int(k),), generator=gen).tolist() for k in lens]


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--batches", type=int, default=4, help="timed batches per decoder (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--index", default=str(INDEX))
    ap.add_argument("--tie-tol", type=float, default=None,
                    help="score gap under which a swap is a near-tie (default 1e-4 in float32, 5e-2 in bf16/fp16)")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.tie_tol is None:
        # float32 sums of 3 log-probs agree to ~1e-5 across kernels; 16-bit logits round far coarser
        args.tie_tol = 1e-4 if args.dtype == "float32" else 5e-2
    torch.set_num_threads(args.threads)

    index = read_index(args.index)
    tokens = index.all_tokens()
    token_to_id = {t: FIRST_SID_ID + i for i, t in enumerate(tokens)}
    vocab = FIRST_SID_ID + len(tokens)
    cons = SidConstraints.from_sid_tokens(index.items, token_to_id).to(args.device)
    model = build_model(args, vocab)
    pad = 151_643  # Qwen2.5's <|endoftext|>: pad = EOS
    gen = torch.Generator().manual_seed(args.seed)
    batches = [left_pad(make_prompts(args, args.batch, gen), pad, args.device) for _ in range(args.batches + 1)]

    def ours(b):
        out = constrained_beam_search(model, *b, cons, args.beams)
        return out.sid_strings(cons), out.scores.float().cpu()

    def base(b):
        return hf_prefix_beam_search(model, *b, cons, args.beams, pad)

    load_start = os.getloadavg()[0]
    ours(batches[0]), base(batches[0])  # warm-up (allocator, kernels)
    t_ours = t_base = 0.0
    verdicts = {"identical": 0, "near-tie": 0, "mismatch": 0}
    max_score_diff = 0.0
    for b in batches[1:]:
        (s_ours, sc_ours), dt = timed(lambda: ours(b), args.device)
        t_ours += dt
        (s_base, sc_base), dt = timed(lambda: base(b), args.device)
        t_base += dt
        for x, xs, y, ys in zip(s_ours, sc_ours.tolist(), s_base, sc_base.cpu().tolist()):
            verdicts[compare_topk(x, xs, y, ys, args.tie_tol)] += 1
        max_score_diff = max(max_score_diff, float((sc_ours - sc_base.cpu()).abs().max()))
    users = args.batches * args.batch
    ups_ours, ups_base = users / t_ours, users / t_base
    p = PRESETS[args.preset]
    lines = [
        f"users: {users} ({args.batches} batches x {args.batch}), beams {args.beams}, prompt ~{args.prompt_len} tokens, "
        f"catalogue {cons.num_sids} SIDs, vocab {vocab}",
        f"model: random Qwen2 hidden {p['hidden']}, {p['layers']} layers, {args.dtype} on {args.device}",
        f"baseline (generate + prefix_allowed_tokens_fn, Python trie): {ups_base:.2f} users/s",
        f"tsrec constrained_beam_search:                               {ups_ours:.2f} users/s",
        f"speed-up: {ups_ours / ups_base:.1f}x",
        f"top-K identical: {verdicts['identical']}/{users} prompts, near-ties (swapped scores within "
        f"{args.tie_tol:.0e}): {verdicts['near-tie']}, real mismatches: {verdicts['mismatch']}; "
        f"max |score diff| at equal rank {max_score_diff:.2e}",
        f"1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end (other jobs share the machine)",
    ]
    print("\n".join(lines))
    if not args.no_record:
        machine = ("2-core CPU dev box, no GPU" if args.device == "cpu"
                   else torch.cuda.get_device_name(0) if torch.cuda.is_available() else args.device)
        cmd = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
        section = (f"\n## decode: constrained beam search vs prefix_allowed_tokens_fn ({args.preset}, {args.device})\n\n"
                   f"- date: {datetime.date.today().isoformat()}; machine: {machine}; torch {torch.__version__}, python {platform.python_version()}, "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {args.threads}\n"
                   f"- command: `{cmd.strip()}`\n" + "".join(f"- {line}\n" for line in lines))
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(section)
    return 0 if verdicts["mismatch"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
