"""The demo's CPU backbone: seconds per SFT step and valid NDCG@10 for each candidate, same data, one run (CPU).

    python benchmarks/demo_backbone.py [--run runs/demo] [--steps 300] [--seeds 42]

Needs a demo run folder with data/, sids/ and semantics/ (``tsrec run --config configs/demo.yaml``). Candidates,
each initialised by ``tsrec model init`` at SA-Init depth 3 (the smollm2-576 one by hand, see below) and trained
by the SFT loop in this process (world size 1, the demo's batch 16, lr and task mixture, ``--steps`` steps):

- ``bpe-64``: the previous demo backbone, a byte-level BPE trained on the templates and titles (2,048 pieces),
  random embeddings, hidden 64 x 2 layers;
- ``smollm2-64``: SmolLM2's vocabulary pruned to the run's texts, embeddings PCA-projected to 64, 2 random
  layers (``model.tiny_vocab=smollm2``, the demo's default now);
- ``smollm2-128``: the same at hidden 128;
- ``smollm2-576``: the pruned vocabulary with SmolLM2's own 576-d rows and its first 2 transformer blocks
  (no projection, pretrained layers).

Prints and appends to benchmarks/RESULTS.md: median s/step, tokens/s, valid loss and valid NDCG@10 / HR@10 (every
valid row, beam 10) after the last step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tsrec.config import load_config  # noqa: E402
from tsrec.model import init_model  # noqa: E402
from tsrec.runtime import LocalContext  # noqa: E402
from tsrec.sft.loop import train_sft  # noqa: E402
from tsrec.train.metrics import read_metrics_csv  # noqa: E402

DEMO = REPO / "configs" / "demo.yaml"
CANDIDATES = {
    "bpe-64": ["model.tiny_vocab=bpe", "model.tiny_tokenizer_titles=true", "model.tiny_vocab_size=2048"],
    "smollm2-64": ["model.tiny_vocab=smollm2"],
    "smollm2-128": ["model.tiny_vocab=smollm2", "model.tiny_hidden_size=128"],
    "smollm2-576": ["model.tiny_vocab=smollm2"],  # then replaced by SmolLM2's own rows and first 2 blocks
}


def smollm2_blocks(model_dir: Path, teacher: Path, depth: int, layers: int = 2) -> None:
    """Rewrite ``model_dir`` (a pruned-vocabulary init) as SmolLM2's first ``layers`` blocks at width 576 with
    SmolLM2's unprojected rows for the pruned vocabulary (SID rows: SA-Init of the first ``depth`` levels
    recomputed on the 576-d rows)."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tsrec.pretrained import smollm2_hf_dir
    from tsrec.pruned_lm import smollm2_embeddings
    from tsrec.semantics.records import read_teacher_file
    from tsrec.semantics.sa_init import init_text, sa_init_rows, select_records

    src = Path(smollm2_hf_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    full_tok, table = smollm2_embeddings()
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers, cfg.vocab_size, cfg.tie_word_embeddings = layers, len(tok), True
    model = AutoModelForCausalLM.from_config(cfg)
    state = {}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if any(k.startswith(f"model.layers.{i}.") for i in range(layers)) or k == "model.norm.weight":
                state[k] = f.get_tensor(k).float()
    model.load_state_dict(state, strict=False)
    full_vocab = full_tok.get_vocab()
    rows = model.get_input_embeddings().weight
    sid_rows = []
    with torch.no_grad():
        for piece, i in tok.get_vocab().items():
            if piece in full_vocab:
                rows[i] = table[full_vocab[piece]]
            else:  # a SID token: the mean row (mean resizing's expectation), then SA-Init below
                rows[i] = table.mean(0)
                sid_rows.append(piece)
        chosen = [r for r in select_records(read_teacher_file(teacher), depth) if r["token"] in tok.get_vocab()]
        ids = tok.convert_tokens_to_ids([r["token"] for r in chosen])
        pieces = [tok(init_text(r, "keywords"), add_special_tokens=False)["input_ids"] for r in chosen]
        rows.copy_(sa_init_rows(rows, ids, pieces))
    model.save_pretrained(model_dir)


def run(name: str, overrides: list[str], args, work: Path) -> dict:
    base = [*CANDIDATES[name], *overrides, "sa_init.depth=3", f"sft.max_steps={args.steps}",
            f"sft.eval_every_steps={args.steps}", f"sft.save_every_steps={args.steps}", "sft.log_every_steps=1",
            "sft.valid_ranking_sample=100000", "sft.valid_ranking_beams=10", "sft.best_metric=ndcg@10"]
    cfg = load_config(DEMO, base)
    run_dir = Path(args.run)
    model = work / f"{name}-{cfg.run.seed}-init"
    init_model(cfg, run_dir / "sids", run_dir / "semantics" / "description_keywords.json", model)
    if name == "smollm2-576":
        smollm2_blocks(model, run_dir / "semantics" / "description_keywords.json", cfg.sa_init.depth)
    t0 = time.time()
    out = work / f"{name}-{cfg.run.seed}"
    train_sft(cfg, model, run_dir / "data", run_dir / "sids", run_dir / "semantics" / "description_keywords.json",
              LocalContext(out))
    rows = read_metrics_csv(out / "logs" / "metrics.csv")
    step_s = statistics.median(r["train/step_s"] for r in rows[5:])
    last = [r for r in rows if "eval/loss" in r][-1]
    return {"name": name, "seed": cfg.run.seed, "step_s": step_s,
            "tok_s": statistics.median(r["train/tokens_per_s"] for r in rows[5:]), "valid_loss": last["eval/loss"],
            "ndcg10": last.get("eval/ndcg@10"), "hr10": last.get("eval/hr@10"), "wall_s": time.time() - t0,
            "params": sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model).parameters())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--only", default=",".join(CANDIDATES))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds.split(","):
            for name in args.only.split(","):
                results.append(run(name, [f"run.seed={seed}"], args, Path(tmp)))
                r = results[-1]
                print(f"{r['name']:12s} seed {r['seed']}: {r['step_s']:.3f} s/step {r['tok_s']:.0f} tok/s valid loss "
                      f"{r['valid_loss']:.4f} NDCG@10 {r['ndcg10']:.4f} HR@10 {r['hr10']:.4f} ({r['params']:,} params)",
                      flush=True)
    lines = [f"\n## demo_backbone: the demo's CPU backbone candidates (SFT {args.steps} steps, world 1)\n",
             f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()} {os.cpu_count()} CPUs, no GPU; "
             f"torch {torch.__version__}, torch threads {torch.get_num_threads()}; 1-min load {load0:.1f} at start, "
             f"{os.getloadavg()[0]:.1f} at end",
             f"- command: `python benchmarks/demo_backbone.py --run {args.run} --steps {args.steps} --seeds {args.seeds}`",
             "- data: the demo run's catalogue (300 items), SIDs and teacher file; SA-Init depth 3; batch 16, lr 4e-3",
             "", "| backbone | seed | params | s/step | tokens/s | valid loss | valid NDCG@10 | valid HR@10 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['seed']} | {r['params']:,} | {r['step_s']:.3f} | {r['tok_s']:.0f} | "
              f"{r['valid_loss']:.4f} | {r['ndcg10']:.4f} | {r['hr10']:.4f} |" for r in results]
    base = {r["seed"]: r["step_s"] for r in results if r["name"] == "bpe-64"}
    lines += [""] + [f"- {r['name']} / bpe-64 s/step (seed {r['seed']}): {r['step_s'] / base[r['seed']]:.2f}x"
                     for r in results if r["name"] != "bpe-64" and r["seed"] in base]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
