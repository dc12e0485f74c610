"""Benchmark: item embedding throughput (in-process vs Ray Data actor pools) and SID build time.

    python benchmarks/embed_sid.py [--items 512] [--max-length 128]

Measures, in one run on the Industrial items (METHOD.md 1.2-1.3):
1. in-process TextEncoder, texts in catalogue order (baseline) vs length-sorted batches (what
   ``TextEncoder.encode`` does): items/s;
2. Ray Data ``map_batches`` with 1 and 2 TextEncoder actors (1 CPU and 1 torch thread each), end to end
   including actor start-up: items/s;
3. SID build (residual k-means 3 x 256 + collision resolution + artifacts) on the full catalogue, from
   embeddings (real embeddings of the first ``--items`` items tiled with noise to 3,686 rows, because
   embedding the whole catalogue here would dominate the run).
Appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
INDUSTRIAL = REPO.parent / "shared" / "data" / "amazon" / "Industrial_and_Scientific"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    from tsrec.config import load_config
    from tsrec.data.prepare import prepare_data
    from tsrec.data.schema import read_items
    from tsrec.embed import TextEncoder, item_texts
    from tsrec.sid.build import build_sids

    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_sid."))
    prepare_data(load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"]), tmp / "data")
    all_items = read_items(tmp / "data").sort_by("item_id")
    items = all_items.slice(0, args.items)
    texts = item_texts(items)
    load0 = os.getloadavg()[0]
    lines = [
        f"- items: {len(texts)} Industrial items (title + description), max_length {args.max_length}, "
        f"batch {args.batch_size}, encoder all-MiniLM-L6-v2 (float32, cpu), torch threads {torch.get_num_threads()}"
    ]

    # --- 1. in-process: catalogue order vs length-sorted batches ---
    enc = TextEncoder(batch_size=args.batch_size, max_length=args.max_length, device="cpu")
    enc.encode(texts[:8])  # warm-up
    t0 = time.perf_counter()
    with torch.inference_mode():
        unsorted = np.concatenate(
            [enc._encode_batch(texts[i : i + args.batch_size]) for i in range(0, len(texts), args.batch_size)]
        )
    t_unsorted = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = enc.encode(texts)
    t_sorted = time.perf_counter() - t0
    diff = float(np.abs(unsorted - ref).max())
    lines += [
        f"- in-process, catalogue order (baseline): {len(texts) / t_unsorted:.1f} items/s ({t_unsorted:.1f} s)",
        f"- in-process, length-sorted batches:      {len(texts) / t_sorted:.1f} items/s ({t_sorted:.1f} s); "
        f"speed-up {t_unsorted / t_sorted:.2f}x; max |diff| {diff:.1e}",
    ]
    del enc

    # --- 2. Ray Data actor pools, 1 and 2 actors, end to end ---
    import ray

    from tsrec.orchestration.embed import embed_items_ray

    # address="local": a fresh in-process cluster, never another session's head on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            cfg = load_config(
                None,
                [
                    f"embed.max_length={args.max_length}",
                    f"embed.batch_size={args.batch_size}",
                    "embed.device=cpu",
                    f"resources.embed.workers={workers}",
                    "resources.embed.cpus_per_worker=1",
                ],
            )
            t0 = time.perf_counter()
            got = embed_items_ray(cfg, items)
            dt = time.perf_counter() - t0
            lines.append(
                f"- Ray Data, {workers} actor(s) x 1 CPU, incl. actor start-up: {len(texts) / dt:.1f} items/s "
                f"({dt:.1f} s; {t_sorted / dt:.2f}x in-process); max |diff| vs in-process "
                f"{float(np.abs(got - ref).max()):.1e}"
            )
    finally:
        ray.shutdown()

    # --- 3. SID build on a catalogue-sized embedding matrix ---
    n_all = all_items.num_rows
    rng = np.random.default_rng(0)
    reps = -(-n_all // len(ref))
    emb = np.tile(ref, (reps, 1))[:n_all] + rng.normal(scale=0.02, size=(n_all, ref.shape[1])).astype(np.float32)
    for threads in (1, 2):
        cfg = load_config(None, [f"sid.threads={threads}"])
        t0 = time.perf_counter()
        stats = build_sids(cfg, tmp / "data", tmp / f"sids{threads}", embeddings=emb)
        dt = time.perf_counter() - t0
        lines.append(
            f"- SID build, {n_all} items x {emb.shape[1]}-d, 3 x 256, faiss threads {threads}: {dt:.2f} s "
            f"(k-means {stats['timing_s']['kmeans']:.2f} s, collisions {stats['timing_s']['collisions']:.2f} s; "
            f"collision groups before {stats['collisions_before']['collision_groups']}, after "
            f"{stats['collisions_after']['collision_groups']})"
        )
    lines.append(f"- 1-min load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (shared machine)")

    text = "\n".join(lines)
    print(text)
    if not args.no_results:
        header = (
            "\n## embed + SID build: in-process vs Ray Data actors (benchmarks/embed_sid.py)\n\n"
            f"2-core CPU dev box, no GPU, 2026-11-26; python {platform.python_version()}, torch {torch.__version__}. "
            f"Command: `python benchmarks/embed_sid.py --items {args.items} --max-length {args.max_length}`\n\n"
        )
        with open(REPO / "benchmarks" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()
