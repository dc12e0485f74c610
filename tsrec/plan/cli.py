"""The ``tsrec plan`` subcommand: table or JSON of the candidates, and ``--write`` of the best as overrides."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from tsrec.plan.planner import PlanError, Setup, best, candidates, load_backbone

PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "reference", "kv_cache", "buffers", "overhead",
         "total")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory of ZeRO/offload/checkpointing/LoRA candidates for a backbone")
    p.add_argument("--backbone", required=True, help="preset (qwen2.5-0.5b/1.5b/3b/7b/14b), model folder or config.json")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, required=True, help="usable memory per GPU in GiB (H200: 140, H100: 79)")
    p.add_argument("--host-mem", type=float, default=0.0, help="host RAM per node in GiB for offload (0 = not checked)")
    # dest differs from "stage": that is the subcommand's own name in tsrec/cli.py
    p.add_argument("--stage", dest="plan_stage", choices=["sft", "rl"], default="sft")
    p.add_argument("--lora", action="store_true", help="LoRA candidates only")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per (packed) sequence")
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per GPU per micro-step (RL: prompts x group)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--sid-tokens", type=int, default=768, help="SID tokens added to the vocabulary")
    p.add_argument("--supervised-fraction", type=float, default=0.15, help="share of positions with a target (R6)")
    p.add_argument("--headroom", type=float, default=0.10, help="fits = total <= (1 - headroom) x --gpu-mem")
    p.add_argument("--json", action="store_true", help="print the candidates as a JSON list")
    p.add_argument("--write", metavar="FILE", help="write the fastest fitting candidate as YAML config overrides")


def run(args: argparse.Namespace) -> int:
    """Prints the plan; returns 0, or 3 when no candidate fits (so scripts can branch on it)."""
    if not 0 <= args.supervised_fraction <= 1:
        raise PlanError(f"--supervised-fraction must be in [0, 1], got {args.supervised_fraction}")
    b = load_backbone(args.backbone, args.sid_tokens)
    setup = Setup(gpus_per_node=args.gpus_per_node, nodes=args.nodes, gpu_mem_gib=args.gpu_mem, stage=args.plan_stage,
                  seq_len=args.seq_len, micro_batch=args.micro_batch, precision=args.precision,
                  supervised_fraction=args.supervised_fraction, sid_rows=args.sid_tokens, host_mem_gib=args.host_mem,
                  headroom=args.headroom)
    cands = candidates(b, setup, lora=True if args.lora else None)
    top = best(cands)
    if args.json:
        print(json.dumps([c.to_json() for c in cands], indent=2))
    else:
        print(format_table(b, setup, cands, top))
    if args.write:
        if top is None:
            raise PlanError("no candidate fits: nothing written (more GPUs, a smaller micro batch or --lora)")
        doc = top.overrides(args.plan_stage, args.precision)
        doc[args.plan_stage]["micro_batch_size"] = args.micro_batch
        header = (f"# tsrec plan: {b.name}, {args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_mem} GiB, "
                  f"{args.plan_stage}, seq {args.seq_len} x micro {args.micro_batch}: {top.gib['total']} GiB per GPU\n")
        Path(args.write).write_text(header + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return 0 if top is not None else 3


def format_table(b, setup: Setup, cands, top) -> str:
    parts = [k for k in PARTS if k in cands[0].gib]
    lines = [f"{b.name}: {b.params() / 1e9:.2f}B params (vocab {b.vocab}, {'tied' if b.tie else 'untied'} head), "
             f"{setup.stage}, {setup.nodes} node(s) x {setup.gpus_per_node} GPU(s) of {setup.gpu_mem_gib} GiB, "
             f"{setup.precision}, seq {setup.seq_len} x micro {setup.micro_batch}; GiB per GPU",
             f"{'zero':>4} {'off_opt':>7} {'off_par':>7} {'lora':>5} {'ckpt':>5} "
             + " ".join(f"{k[:9]:>9}" for k in parts) + f" {'host/node':>9} {'time':>5}  fits"]
    for c in cands:
        mark = "  <- best" if c is top else ""
        lines.append(f"{c.zero_stage:>4} {str(c.offload_optimizer):>7} {str(c.offload_params):>7} {str(c.lora):>5} "
                     f"{str(c.gradient_checkpointing):>5} " + " ".join(f"{c.gib[k]:>9.2f}" for k in parts)
                     + f" {c.host_gib_per_node:>9.1f} {c.relative_step_time:>5.2f}  "
                     + ("fits" if c.fits else "does not fit") + mark)
    lines.append("best: " + (json.dumps(top.overrides(setup.stage, setup.precision)) if top else "none fits"))
    return "\n".join(lines)
