"""Benchmark: streamed columnar amazon2018 preparation vs a line-by-line Python reference.

Generates a raw ``Bench_5.json`` (reviews with ~300-byte review texts, like the real files) and
``meta_Bench.json``, then runs, each in a fresh child process (so peak RSS is per variant):
- baseline: read every line with ``json.loads`` into dicts, then the pure-Python reference of
  METHOD.md 1.1 (tests/data/test_amazon2018.py::reference_pipeline), the upstream approach;
- candidate: ``tsrec.data.prepare.prepare_data`` (pyarrow block reader + NumPy).
Checks that both give the same split sizes and item count, prints wall time and peak RSS ratios and
appends a section to benchmarks/RESULTS.md.

    python benchmarks/data_amazon2018.py --reviews 400000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
T0 = 1_483_228_800  # 2017-01-01 UTC


def generate(folder: Path, n_reviews: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = max(n_reviews // 8, 10), max(n_reviews // 40, 10)
    users = rng.integers(0, n_users, n_reviews)
    items = np.minimum(rng.zipf(1.3, n_reviews) - 1, n_items - 1)
    days = rng.integers(-400, 700, n_reviews)
    text = "This works as described and arrived on time. " * 7
    with open(folder / "Bench_5.json", "w") as f:
        for u, i, d in zip(users, items, days):
            f.write(f'{{"overall": 5.0, "verified": true, "reviewerID": "U{u:09d}", "asin": "B{i:09d}", "reviewerName": "Name", '
                    f'"reviewText": "{text}", "summary": "Good", "unixReviewTime": {T0 + int(d) * 86400}}}\n')
    with open(folder / "meta_Bench.json", "w") as f:
        for i in range(n_items):
            f.write(json.dumps({"asin": f"B{i:09d}", "title": f"Bench product {i} heavy duty", "description": [text], "brand": "Acme"}) + "\n")


def _candidate(folder: str, out: str, q) -> None:
    from tsrec.config import load_config
    from tsrec.data.prepare import prepare_data

    cfg = load_config(None, ["data.source=amazon2018", f"data.input={folder}", "data.min_items=0",
                             "data.window_start='2017-01-01'", "data.window_end='2018-11-01'"])
    t = time.perf_counter()
    stats = prepare_data(cfg, Path(out))
    q.put((time.perf_counter() - t, stats["items"], stats["rows"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def _baseline(folder: str, q) -> None:
    spec = importlib.util.spec_from_file_location("ref", REPO / "tests" / "data" / "test_amazon2018.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    t = time.perf_counter()
    with open(Path(folder) / "Bench_5.json") as f:
        reviews = [json.loads(line) for line in f]
    with open(Path(folder) / "meta_Bench.json") as f:
        meta = [json.loads(line) for line in f]
    titles, splits = ref.reference_pipeline(meta, reviews, 5, T0, 1_541_030_400)  # same window as the candidate
    q.put((time.perf_counter() - t, len(titles), {s: len(v) for s, v in splits.items()}, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def run(fn, *args):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=fn, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reviews", type=int, default=400_000)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        generate(folder, args.reviews)
        size_mb = (folder / "Bench_5.json").stat().st_size / 1e6
        cand = run(_candidate, str(folder), str(folder / "out"))
        base = run(_baseline, str(folder))
    assert cand[1] == base[1] and cand[2] == base[2], f"outputs differ: {cand[1:3]} vs {base[1:3]}"
    lines = [
        f"reviews file: {args.reviews:,} lines, {size_mb:.0f} MB; items {cand[1]:,}; rows {cand[2]}",
        f"baseline (json.loads + Python reference): {base[0]:.2f} s, peak RSS {base[3] / 1024:.0f} MiB",
        f"candidate (pyarrow blocks + NumPy):       {cand[0]:.2f} s, peak RSS {cand[3] / 1024:.0f} MiB",
        f"speed-up {base[0] / cand[0]:.1f}x, peak RSS ratio (candidate/baseline) {cand[3] / base[3]:.2f}",
    ]
    print("\n".join(lines))
    if args.no_record:
        return
    section = (
        "\n## data: amazon2018 preparation, streamed columnar vs line-by-line Python\n\n"
        "Machine: 2-core CPU dev box, no GPU (shared with other jobs). Date: 2026-11-26.\n"
        f"Command: `python benchmarks/data_amazon2018.py --reviews {args.reviews}`\n\n```\n" + "\n".join(lines) + "\n```\n"
    )
    with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(section)


if __name__ == "__main__":
    main()
