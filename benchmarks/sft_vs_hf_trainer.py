"""SFT speed: tsrec's SFT loop vs Hugging Face ``transformers.Trainer``, same model, samples and schedule (CPU fp32).

    OMP_NUM_THREADS=1 python benchmarks/sft_vs_hf_trainer.py [--steps 40] [--sizes 128x2,256x4] [--no-append]

Sides (each in its own process, one CPU thread, optimiser steps in lockstep, see Time below):

- ``trainer``: ``transformers.Trainer`` as the public MiniOneRec/TS-Rec SFT uses it (written here, not
  copied): a list dataset of ``{input_ids, labels}`` (labels -100 on the prompt), a collator that
  right-pads each micro-batch to its longest sample (a multiple of 8) with an attention mask and labels
  -100 on padding, AdamW (the Trainer's default ``adamw_torch_fused``), linear schedule with warm-up,
  ``max_grad_norm``, gradient accumulation, and a *sequential* sampler (``Trainer`` shuffles by default).
  The loss is the model's own (full ``(B, T, V)`` logits, cross-entropy summed over label tokens and
  divided by ``num_items_in_batch``, the Trainer's count of label tokens of the whole optimiser step).
- ``trainer-grouped``: the same Trainer with each step's samples sorted by length (a diagnostic, not
  the public setup): its micro-batches are exactly tsrec's length-grouped ones, so it separates the
  padding saved by length-grouping from the rest of the two loops.
- ``tsrec-packed``: ``tsrec.sft.loop.train_sft`` in one process (``LocalContext``, DeepSpeed ZeRO-2 on
  CPU, world size 1, fp32), as tests/sft/test_sft_loop.py calls it, with its default packing.
- ``tsrec-grouped``: the same with ``sft.packing=false`` (length-grouped padded micro-batches).

Same for all sides: the initial HF folder (a tiny Qwen2 from ``tsrec.tiny``), the samples of each
optimiser step (tsrec's ``rank_share`` for world size 1 in epoch 0 is the mixture in file order, so the
Trainer gets the first ``steps x global_batch`` samples in that order), global batch, micro-batch size,
lr, warm-up, linear decay to 0 at the last step, grad clipping 1.0, no weight decay. tsrec's loop builds
its mixture itself: the worker hands it the same truncated mixture (``build_mixture`` patched, so the
loop tokenises only the samples it trains on and its LR horizon is ``steps``); that is set-up, not timed.

Loss: both are the per-token mean over the supervised tokens of the whole optimiser step (tsrec:
weighted by ``sft.tasks.<task>.loss_weight``, all 1.0 here, so the same number; the Trainer has no per-task
weight). The per-step real-token counts must agree exactly and the step-1 losses (initial weights) to
float rounding, else the script fails. Valid loss: the same function (padded forward, token-mean CE of
next-SID on the first ``--eval-samples`` valid rows) on each side's final model, plus each side's own
number (tsrec ``eval/loss``; ``Trainer.evaluate()``'s ``eval_loss``).

Time: the sides run concurrently in lockstep: the driver lets one side do one optimiser step at a time,
rotating the order every step, so every side meets the same load of the shared box. The cost of a step
is from the driver's go after the previous step to the end of this one (all a step costs: batch
building, forward, backward, optimiser, logging), in wall seconds and in CPU seconds of the process (less
sensitive to the box's load); median over steps ``--warm``+1 .. steps-1 (the last step of tsrec also
validates and saves). Real tokens/s = real (non-padding) tokens of those steps / their seconds.

Data: the real Industrial SFT mixture (../shared/data, tokenised by the tiny BPE + Industrial SID tokens,
as benchmarks/sft_packing.py), else the synthetic catalogue of tests/sft/sft_synth.py. Appends a section
to benchmarks/RESULTS.md unless ``--no-append``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INDUSTRIAL = REPO.parent / "shared" / "data" / "amazon" / "Industrial_and_Scientific"
TEACHER = REPO.parent / "shared" / "data" / "tsrec" / "Industrial_and_Scientific" / "Industrial_and_Scientific.description_keywords.json"
SIDES = ("trainer", "trainer-grouped", "tsrec-packed", "tsrec-grouped")


# ----------------------------------------------------------------------------------------------- shared

def pad_batch(samples, pad_id: int, multiple: int = 8) -> dict:
    """Right-pad ``{input_ids, labels}`` samples to the longest (a multiple of ``multiple``): the public collator."""
    import torch

    width = max(len(s["input_ids"]) for s in samples)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[r, :n] = torch.tensor(s["input_ids"])
        labels[r, :n] = torch.tensor(s["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def as_dicts(tokenized) -> list[dict]:
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in tokenized]


def plain_valid_loss(model, samples: list[dict], pad_id: int, micro: int) -> float:
    """Token-mean cross-entropy over all label tokens of ``samples`` (one function for both sides' models)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), micro):
            b = pad_batch(samples[i : i + micro], pad_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            target = b["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / max(count, 1)


class Gate:
    """End of each optimiser step in a worker: stamp wall and CPU time, tell the driver, wait for its go.

    The driver lets one side run one step at a time, rotating the order every step, so all sides meet the
    same load of a shared box (lockstep); the cost of step k is from the go after step k-1 to the end of
    step k: wall seconds, and CPU seconds of the process (all its threads), which the load changes less.
    """

    def __init__(self, job: dict):
        self.done_fd, self.go_fd = job.get("done_fd"), job.get("go_fd")
        self.start = (time.perf_counter(), time.process_time())
        self.ends: list[tuple[float, float]] = []
        self.goes: list[tuple[float, float]] = []

    def step_end(self) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))
        if self.done_fd is not None:
            os.write(self.done_fd, b"d")
            if os.read(self.go_fd, 1) != b"g":
                raise SystemExit("driver gone")
        self.goes.append((time.perf_counter(), time.process_time()))

    def costs(self, which: int) -> list[float]:
        """Per-step seconds (0 = wall, 1 = CPU)."""
        starts = [self.start] + self.goes[:-1]
        return [e[which] - s[which] for s, e in zip(starts, self.ends)]


def timed_steps(n: int, warm: int) -> list[int]:
    """Indices of the steps timed: ``warm`` .. n-2 (the last one also validates/saves on the tsrec side)."""
    return list(range(warm, max(warm + 1, n - 1)))


def summarise(gate: Gate, real: list[int], total: list[int], warm: int) -> dict:
    idx = timed_steps(len(gate.ends), warm)
    out = {"padding_share": 1 - sum(real) / max(sum(total), 1)}
    for which, name in ((0, "wall"), (1, "cpu")):
        secs = gate.costs(which)
        out[f"{name}_step_s_all"] = secs
        out[f"{name}_step_s_median"] = statistics.median(secs[i] for i in idx)
        out[f"{name}_tokens_per_s"] = sum(real[i] for i in idx) / sum(secs[i] for i in idx)
    return out


# ----------------------------------------------------------------------------------------------- workers

def worker_tsrec(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from tsrec.config import load_config
    from tsrec.runtime import LocalContext
    from tsrec.sft import loop
    from tsrec.sft.tasks import tokenize_samples

    with open(job["mix"], "rb") as f:
        mix = pickle.load(f)
    loop.build_mixture = lambda *a, **k: mix  # the truncated mixture the Trainer side also gets (set-up, untimed)

    class TimedContext(LocalContext):
        """LocalContext that ends each optimiser step at the gate (the loop reports every step)."""

        def __init__(self, root):
            super().__init__(root)
            self.gate = Gate(job)

        def report(self, step, metrics, checkpoint_dir=None):
            self.gate.step_end()
            super().report(step, metrics, checkpoint_dir)

    overrides = [*job["overrides"], f"sft.packing={'true' if job['side'] == 'tsrec-packed' else 'false'}"]
    cfg = load_config(None, overrides)
    ctx = TimedContext(Path(job["root"]))
    summary = loop.train_sft(cfg, Path(job["model"]), Path(job["data"]), Path(job["sids"]),
                             Path(job["semantics"]) if job["semantics"] else None, ctx)
    rows = ctx.metrics
    real = [round(r["train/tokens_per_s"] * r["train/step_s"]) for r in rows]
    total = [round(rr / max(1 - r["train/padding_frac"], 1e-12)) for rr, r in zip(real, rows)]
    out = summarise(ctx.gate, real, total, job["warm"])
    out.update(losses=[r["train/loss"] for r in rows], real_tokens=real, own_valid_loss=summary["final_val_loss"],
               threads=torch.get_num_threads())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(job["model"])
    valid = as_dicts(tokenize_samples(tok, mix.valid, cfg.sft.cutoff_len))
    final = AutoModelForCausalLM.from_pretrained(Path(job["root"]) / "final", dtype=torch.float32)
    out["valid_loss"] = plain_valid_loss(final, valid, tok.pad_token_id, cfg.sft.micro_batch_size)
    return out


def worker_trainer(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from tsrec.config import load_config
    from tsrec.sft.tasks import tokenize_samples

    with open(job["mix"], "rb") as f:
        mix = pickle.load(f)
    cfg = load_config(None, job["overrides"])
    sft = cfg.sft
    tok = AutoTokenizer.from_pretrained(job["model"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = as_dicts(tokenize_samples(tok, mix.train, sft.cutoff_len, sft))
    valid = as_dicts(tokenize_samples(tok, mix.valid, sft.cutoff_len))
    if job["side"] == "trainer-grouped":  # each step's samples sorted by length (stable), as tsrec's unpacked batches
        g = sft.global_batch_size
        train = [r for i in range(0, len(train), g) for r in sorted(train[i : i + g], key=lambda r: len(r["input_ids"]))]

    class ListDataset(Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    class Clock(TrainerCallback):
        def __init__(self):
            self.losses, self.real, self.total = [], [], []
            self.gate = None
            self.cur_real = self.cur_total = 0

        def on_train_begin(self, args, state, control, **kw):
            self.gate = Gate(job)

        def on_step_end(self, args, state, control, **kw):
            self.gate.step_end()
            self.real.append(self.cur_real)
            self.total.append(self.cur_total)
            self.cur_real = self.cur_total = 0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    clock = Clock()

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):  # the Trainer's default is a RandomSampler
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.cur_real += int(inputs["attention_mask"].sum())
            clock.cur_total += int(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    gas = sft.global_batch_size // sft.micro_batch_size
    args = TrainingArguments(
        output_dir=job["root"], per_device_train_batch_size=sft.micro_batch_size,
        per_device_eval_batch_size=sft.micro_batch_size, gradient_accumulation_steps=gas,
        learning_rate=sft.lr, weight_decay=sft.weight_decay, warmup_steps=sft.warmup_steps, lr_scheduler_type="linear",
        max_steps=sft.max_steps, max_grad_norm=sft.grad_clip, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True, seed=cfg.run.seed,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False, disable_tqdm=True,
        train_sampling_strategy="sequential")
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=ListDataset(train),
                                data_collator=lambda rows: pad_batch(rows, pad_id), callbacks=[clock])
    trainer.train()
    out = summarise(clock.gate, clock.real, clock.total, job["warm"])
    own = trainer.evaluate(eval_dataset=ListDataset(valid))["eval_loss"]
    out.update(losses=clock.losses, real_tokens=clock.real, own_valid_loss=own, optim=str(args.optim.value),
               threads=torch.get_num_threads(),
               valid_loss=plain_valid_loss(trainer.model, valid, pad_id, sft.micro_batch_size))
    return out


# ----------------------------------------------------------------------------------------------- driver

def build_inputs(tmp: Path, args) -> dict:
    """Data folder, SID folder, teacher file and the config overrides; Industrial when present."""
    base = [f"sft.global_batch_size={args.global_batch}", f"sft.micro_batch_size={args.micro}", f"sft.lr={args.lr}",
            f"sft.warmup_steps={args.warmup}", "sft.zero_stage=2", "sft.precision=fp32", f"sft.max_steps={args.steps}",
            "sft.epochs=1", f"sft.eval_every_steps={args.steps}", "sft.save_every_steps=1000000",
            "sft.early_stopping_patience=0", f"sft.max_eval_samples={args.eval_samples}", "sft.weight_decay=0.0",
            "sft.grad_clip=1.0", f"run.seed={args.seed}"]
    if INDUSTRIAL.exists() and TEACHER.exists() and not args.synthetic:
        from tsrec.config import load_config
        from tsrec.data.prepare import prepare_data

        prepare_data(load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"]), tmp / "data")
        return {"name": "Industrial SFT mixture", "data": tmp / "data", "sids": INDUSTRIAL / "index",
                "semantics": TEACHER, "overrides": base}
    sys.path.insert(0, str(REPO / "tests" / "sft"))
    from sft_synth import make_tiny_run

    run = make_tiny_run(tmp / "synth", n_items=64, n_train=4000, n_valid=args.eval_samples)
    return {"name": "synthetic catalogue (tests/sft/sft_synth.py)", "data": run["data"], "sids": run["sids"],
            "semantics": run["semantics"], "overrides": base}


def run_lockstep(sides: list[str], job: dict, tmp: Path, steps: int) -> dict:
    """Start one worker process per side, then let them run their optimiser steps in lockstep (``Gate``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, pipes, logs = {}, {}, {}
    t0 = time.perf_counter()
    for side in sides:
        done_r, done_w = os.pipe()
        go_r, go_w = os.pipe()
        spec = {**job, "side": side, "root": str(tmp / f"run_{side}_{job['size']}"), "done_fd": done_w, "go_fd": go_r}
        path = tmp / f"job_{side}_{job['size']}.json"
        path.write_text(json.dumps(spec))
        logs[side] = tmp / f"log_{side}_{job['size']}.txt"
        with open(logs[side], "w") as log:
            procs[side] = subprocess.Popen([sys.executable, __file__, "--worker", str(path)], env=env, stdout=log,
                                           stderr=subprocess.STDOUT, pass_fds=(done_w, go_r))
        os.close(done_w)
        os.close(go_r)
        pipes[side] = (done_r, go_w, spec["root"])

    def wait_done(side: str) -> None:
        if os.read(pipes[side][0], 1) != b"d":
            procs[side].wait()
            sys.stderr.write(logs[side].read_text()[-8000:])
            raise SystemExit(f"{side} worker failed ({procs[side].returncode})")

    for side in sides:  # step 1 of each side (overlaps the others' set-up; not timed)
        wait_done(side)
    for k in range(1, steps):
        order = sides[k % len(sides):] + sides[: k % len(sides)]
        for side in order:
            os.write(pipes[side][1], b"g")
            wait_done(side)
    for side in sides:
        os.write(pipes[side][1], b"g")
    res = {}
    for side in sides:
        if procs[side].wait():
            sys.stderr.write(logs[side].read_text()[-8000:])
            raise SystemExit(f"{side} worker failed ({procs[side].returncode})")
        os.close(pipes[side][0])
        os.close(pipes[side][1])
        res[side] = json.loads((Path(pipes[side][2]) / "result.json").read_text())
    print(f"[bench] {job['size']}: {len(sides)} sides x {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return res


def table(size: str, res: dict, args, tokens_per_step: float) -> list[str]:
    sides = [s for s in SIDES if s in res]
    head = "| " + size + " | " + " | ".join(sides) + " |"
    lines = [head, "|---" * (len(sides) + 1) + "|"]

    def row(name, fmt, key):
        lines.append(f"| {name} | " + " | ".join(fmt(key(res[s])) for s in sides) + " |")

    last = min(10, args.steps)
    steps = f"steps {args.warm + 1}..{args.steps - 1}"
    row(f"wall s / optimiser step (median, {steps})", "{:.3f}".format, lambda r: r["wall_step_s_median"])
    row("CPU s / optimiser step (median)", "{:.3f}".format, lambda r: r["cpu_step_s_median"])
    row("real tokens / wall s", "{:,.0f}".format, lambda r: r["wall_tokens_per_s"])
    row("real tokens / CPU s", "{:,.0f}".format, lambda r: r["cpu_tokens_per_s"])
    row("**tokens/s vs Trainer, wall**", "**{:.2f}x**".format,
        lambda r: r["wall_tokens_per_s"] / res["trainer"]["wall_tokens_per_s"])
    row("**tokens/s vs Trainer, CPU**", "**{:.2f}x**".format,
        lambda r: r["cpu_tokens_per_s"] / res["trainer"]["cpu_tokens_per_s"])
    row("padding share", "{:.3f}".format, lambda r: r["padding_share"])
    row("train loss step 1 (initial weights)", "{:.5f}".format, lambda r: r["losses"][0])
    row(f"train loss step {args.steps}", "{:.4f}".format, lambda r: r["losses"][-1])
    row(f"train loss, mean of last {last} steps", "{:.4f}".format, lambda r: sum(r["losses"][-last:]) / last)
    row("max abs train-loss diff vs Trainer, any step", "{:.1e}".format,
        lambda r: max(abs(a - b) for a, b in zip(r["losses"], res["trainer"]["losses"])))
    row("valid loss (same function, final model)", "{:.4f}".format, lambda r: r["valid_loss"])
    row("valid loss as the side reports it", "{:.4f}".format, lambda r: r["own_valid_loss"])
    lines.append(f"\n({tokens_per_step:,.0f} real tokens per optimiser step on average)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warm", type=int, default=5, help="steps not timed at the start")
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--sizes", default="128x2", help="hidden x layers of the tiny Qwen2, comma-separated")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--synthetic", action="store_true", help="the synthetic catalogue even if Industrial is present")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        out = worker_trainer(job) if job["side"].startswith("trainer") else worker_tsrec(job)
        (Path(job["root"]) / "result.json").write_text(json.dumps(out))
        return
    sides = args.sides.split(",")
    if "trainer" not in sides:
        raise SystemExit("--sides must include trainer (the baseline)")
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsrec.config import load_config
    from tsrec.sft.tasks import TASK_OF_TEMPLATE, build_mixture, tokenize_samples
    from tsrec.sid.index import read_index
    from tsrec.tiny import save_tiny_sid_model

    load_start = os.getloadavg()[0]
    sections = []
    with tempfile.TemporaryDirectory(prefix="sft_vs_hf_") as tmp:
        tmp = Path(tmp)
        inputs = build_inputs(tmp, args)
        cfg = load_config(None, inputs["overrides"])
        mix = build_mixture(cfg, inputs["data"], inputs["sids"], inputs["semantics"])
        need = args.steps * args.global_batch
        if len(mix.train) < need:
            raise SystemExit(f"{len(mix.train)} samples < steps x global batch = {need}")
        texts = [s.target for s in mix.train[:2000]]
        mix.train = mix.train[:need]  # what rank_share draws for world 1 in epoch 0: file order
        mix.counts = dict(Counter(TASK_OF_TEMPLATE[s.task] for s in mix.train))
        with open(tmp / "mix.pkl", "wb") as f:
            pickle.dump(mix, f)
        tokens = read_index(inputs["sids"]).all_tokens()
        for size in args.sizes.split(","):
            hidden, layers = (int(x) for x in size.split("x"))
            model = save_tiny_sid_model(tmp / f"model_{size}", tokens, texts=texts, hidden_size=hidden, layers=layers)
            tok = AutoTokenizer.from_pretrained(model)
            lens = [len(s.input_ids) for s in tokenize_samples(tok, mix.train, cfg.sft.cutoff_len, cfg.sft)]
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
            job = {"size": size, "model": str(model), "data": str(inputs["data"]), "sids": str(inputs["sids"]),
                   "semantics": str(inputs["semantics"]) if inputs["semantics"] else "", "mix": str(tmp / "mix.pkl"),
                   "overrides": inputs["overrides"], "warm": args.warm}
            res = run_lockstep(sides, job, tmp, args.steps)
            for side in sides:  # the same samples per step, the same loss at the initial weights
                if res[side]["real_tokens"] != res["trainer"]["real_tokens"]:
                    raise SystemExit(f"{side}: real tokens per step differ from the Trainer's: not the same batches")
                if abs(res[side]["losses"][0] - res["trainer"]["losses"][0]) > 1e-4:
                    raise SystemExit(f"{side}: step-1 loss {res[side]['losses'][0]} vs Trainer {res['trainer']['losses'][0]}")
            desc = (f"tiny Qwen2 hidden {hidden}, {layers} layers, vocab {len(tok)} ({n_params / 1e6:.2f}M params, tied head); "
                    f"{need} samples ({dict(mix.counts)}), mean {sum(lens) / len(lens):.0f} tokens, max {max(lens)}; "
                    f"Trainer optim {res['trainer']['optim']}; torch threads {res['trainer']['threads']}")
            lines = table(f"{hidden}x{layers}", res, args, sum(lens) / args.steps)
            print("\n" + desc + "\n" + "\n".join(lines), flush=True)
            sections.append((desc, lines))
    load_end = os.getloadavg()[0]
    if args.no_append:
        return
    import deepspeed
    import transformers

    cmd = "OMP_NUM_THREADS=1 python benchmarks/sft_vs_hf_trainer.py " + " ".join(sys.argv[1:])
    text = (f"\n## SFT: tsrec loop vs transformers.Trainer (benchmarks/sft_vs_hf_trainer.py)\n\n"
            f"- date: {time.strftime('%Y-%m-%d')}; machine: {platform.machine()} {os.cpu_count()} CPUs, no GPU (shared); "
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"deepspeed {deepspeed.__version__}; fp32, 1 thread per side, each side its own process, steps in lockstep (one side at a time, order rotated per step)\n"
            f"- command: `{cmd.strip()}`\n"
            f"- data: {inputs['name']}, the first {need} samples of the shuffled mixture (what tsrec's `rank_share` "
            f"draws for world size 1), global batch {args.global_batch}, micro-batch {args.micro} "
            f"(gradient accumulation {args.global_batch // args.micro}), {args.steps} steps, lr {args.lr}, warm-up "
            f"{args.warmup}, linear decay to 0 at step {args.steps}, clip 1.0, no weight decay; valid: first "
            f"{args.eval_samples} next-SID valid rows\n"
            f"- tsrec: `train_sft` with `LocalContext`, DeepSpeed ZeRO-2 on CPU, world size 1; Trainer: sequential "
            f"sampler, right-padding collator (multiple of 8), labels -100 on prompt and padding; per-step real "
            f"tokens identical on all sides (checked)\n"
            f"- 1-min load average {load_start:.1f} at start, {load_end:.1f} at end\n")
    for desc, lines in sections:
        text += f"\n{desc}\n\n" + "\n".join(lines) + "\n"
    with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
