"""A tiny learnable SFT catalogue for tests and benchmarks: next item = (last item + 1) mod N."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tsrec.data.schema import ITEMS_SCHEMA, SAMPLES_SCHEMA
from tsrec.tiny import save_tiny_sid_model

WORDS = ["staples", "glue", "tape", "drill", "relay", "valve", "hose", "gloves"]


def make_tiny_run(root: Path, n_items: int = 16, n_train: int = 96, n_valid: int = 16, seed: int = 0,
                  hidden_size: int = 64) -> dict[str, Path]:
    """Write data/, sids/, semantics/description_keywords.json and model/ under ``root``."""
    rng = random.Random(seed)
    root = Path(root)
    data, sids, sem = root / "data", root / "sids", root / "semantics"
    for d in (data, sids, sem):
        d.mkdir(parents=True, exist_ok=True)
    index = {i: [f"<a_{i // 4}>", f"<b_{i % 4}>"] for i in range(n_items)}
    titles = [f"{WORDS[i % len(WORDS)]} {i}" for i in range(n_items)]
    pq.write_table(pa.table({"item_id": list(range(n_items)), "title": titles, "description": titles},
                            schema=ITEMS_SCHEMA), data / "items.parquet")

    def rows(n: int):
        out = {"user_id": [], "history_item_ids": [], "item_id": [], "timestamp": []}
        for u in range(n):
            start, length = rng.randrange(n_items), rng.randint(1, 3)
            hist = [(start + k) % n_items for k in range(length)]
            out["user_id"].append(f"A{u}")
            out["history_item_ids"].append(hist)
            out["item_id"].append((hist[-1] + 1) % n_items)
            out["timestamp"].append(u)
        return pa.table(out, schema=SAMPLES_SCHEMA)

    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        pq.write_table(rows(n), data / f"{split}.parquet")
    (sids / "index.json").write_text(json.dumps({str(i): t for i, t in index.items()}))
    tokens = sorted({t for ts in index.values() for t in ts})
    records = [{"token": t, "description": f"items like {WORDS[k % len(WORDS)]}", "keywords": [WORDS[k % len(WORDS)]]}
               for k, t in enumerate(tokens)]
    (sem / "description_keywords.json").write_text(json.dumps(records))
    model = save_tiny_sid_model(root / "model", tokens, texts=titles, seed=seed, hidden_size=hidden_size)
    return {"data": data, "sids": sids, "semantics": sem / "description_keywords.json", "model": model}


def assert_resumed_after(rows: list[dict], ckpt_step: int) -> None:
    """Metric rows up to ``ckpt_step`` come from the first attempt, the rest from one that started right
    after it (so no step up to the checkpoint was run again) and later in time (columns ``attempt/*``)."""
    first = [r for r in rows if r["step"] <= ckpt_step]
    second = [r for r in rows if r["step"] > ckpt_step]
    assert first and second
    assert {r["attempt/start_step"] for r in first} == {0}, first
    assert {r["attempt/start_step"] for r in second} == {ckpt_step + 1}, second
    assert min(r["attempt/started_at"] for r in second) > max(r["attempt/started_at"] for r in first)
