"""``tsrec sid build`` (METHOD.md 1.2-1.3, R9): artifacts, and the acceptance run on the Industrial items."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shared_data import INDUSTRIAL, require_shared

from tsrec.artifacts import read_manifest, write_parquet
from tsrec.config import load_config
from tsrec.sid.build import build_sids
from tsrec.sid.index import read_index

# Shorter than the production 256 tokens to keep this module's one full-catalogue embedding cheap
# (3,686 texts, ~25 s on 2 cores); uniqueness, determinism and stats do not depend on the length.
TEST_MAX_LENGTH = 64


@pytest.fixture(scope="module")
def industrial_data(tmp_path_factory) -> Path:
    """The shared Industrial_and_Scientific dataset as a prepared data folder (``tsrec data prepare``)."""
    from tsrec.data.prepare import prepare_data

    require_shared(INDUSTRIAL)
    out = tmp_path_factory.mktemp("industrial_data")
    prepare_data(load_config(None, ["data.source=minionerec", f"data.input={INDUSTRIAL}"]), out)
    return out


@pytest.fixture(scope="module")
def industrial_embeddings(industrial_data) -> np.ndarray:
    """(3686, 384) all-MiniLM-L6-v2 embeddings of the Industrial items, embedded once."""
    from tsrec.data.schema import read_items
    from tsrec.sid.build import embed_items

    cfg = load_config(None, [f"embed.max_length={TEST_MAX_LENGTH}"])
    return embed_items(cfg, read_items(industrial_data).sort_by("item_id"))


@pytest.mark.slow  # ~75 s embedding 3,686 items on 2 cores; the default suite reads the released index instead
def test_industrial_every_item_gets_a_unique_deterministic_sid(industrial_data, industrial_embeddings, tmp_path):
    cfg = load_config(None, [f"embed.max_length={TEST_MAX_LENGTH}", "sid.seed=2024"])
    stats = build_sids(cfg, industrial_data, tmp_path / "a", embeddings=industrial_embeddings)
    build_sids(cfg, industrial_data, tmp_path / "b", embeddings=industrial_embeddings.copy())

    # Every one of the 3,686 items has a unique 3-token SID.
    index = read_index(tmp_path / "a" / "index.json")
    assert sorted(index.items) == list(range(3686))
    assert len(set(index.sids().values())) == 3686
    assert index.num_levels == 3 and all(len(t) == 3 for t in index.items.values())

    # Same seed, same embeddings: byte-identical index, SID table and stats.
    for name in ("index.json", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert pq.read_table(tmp_path / "a" / "sids.parquet").equals(pq.read_table(tmp_path / "b" / "sids.parquet"))

    # stats.json reports utilisation and collisions before/after resolution.
    on_disk = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert on_disk["items"] == 3686 and on_disk["codebook_size"] == 256
    assert len(on_disk["codebook_utilisation_per_level"]) == 3
    assert all(0 < u <= 1 for u in on_disk["codebook_utilisation_per_level"])
    after = {"unique_sids": 3686, "collision_groups": 0, "collision_items": 0, "largest_group": 1}
    assert on_disk["collisions_after"] == after
    before = on_disk["collisions_before"]
    extra_items = before["collision_items"] - before["collision_groups"]  # all but one item per group
    assert before["unique_sids"] + extra_items == 3686
    assert stats["reassigned_items"] == extra_items

    # sids.parquet agrees with index.json; the manifest is complete.
    table = pq.read_table(tmp_path / "a" / "sids.parquet")
    assert table.column("sid").to_pylist() == [index.sid(i) for i in table.column("item_id").to_pylist()]
    assert np.load(tmp_path / "a" / "embeddings.npy").shape == (3686, 384)
    manifest = read_manifest(tmp_path / "a")
    assert manifest["seed"] == 2024 and "encoder" in manifest["inputs"]


@pytest.mark.slow  # shares the 75 s Industrial embedding fixture
def test_industrial_extra_level_mode(industrial_data, industrial_embeddings, tmp_path):
    cfg = load_config(None, ["sid.collision=extra_level"])
    stats = build_sids(cfg, industrial_data, tmp_path / "x", embeddings=industrial_embeddings)
    index = read_index(tmp_path / "x")
    assert len(set(index.sids().values())) == 3686
    assert all(len(t) == 4 and t[3].startswith("<d_") for t in index.items.values())
    assert stats["sid_length"] == 4
    assert stats["distinct_tokens_per_level"][3] == stats["collisions_before"]["largest_group"]


def test_build_embeds_in_process_on_a_small_catalogue(tmp_path):
    """The CLI path (no embeddings given): TextEncoder in-process; codebook clamped to the catalogue."""
    n = 24
    items = pa.table(
        {
            "item_id": pa.array(list(range(n))[::-1], pa.int64()),  # unsorted on disk
            "title": [f"item {i} {'glue' if i % 2 else 'tape'}" for i in range(n)][::-1],
            "description": ["['<b>strong</b> adhesive']" if i % 3 else "" for i in range(n)][::-1],
        }
    )
    write_parquet(items, tmp_path / "data" / "items.parquet")
    cfg = load_config(None, ["embed.max_length=16", "sid.kmeans_iters=5", "sid.codebook_size=8"])
    stats = build_sids(cfg, tmp_path / "data", tmp_path / "sids")
    assert stats["embeddings"] == "computed in-process" and stats["codebook_size"] == 8
    assert stats["collisions_after"]["collision_groups"] == 0
    assert len(set(read_index(tmp_path / "sids").sids().values())) == n
    cfg_tiny = load_config(None, ["embed.max_length=16", "sid.kmeans_iters=5", "sid.codebook_size=256"])
    emb = np.load(tmp_path / "sids" / "embeddings.npy")
    stats = build_sids(cfg_tiny, tmp_path / "data", tmp_path / "sids2", embeddings=emb)
    assert stats["codebook_size"] == 16 and stats["codebook_size_requested"] == 256  # clamped: 24 items


def test_embeddings_must_match_items(tmp_path):
    items = pa.table({"item_id": pa.array([0, 1], pa.int64()), "title": ["a", "b"], "description": ["", ""]})
    write_parquet(items, tmp_path / "data" / "items.parquet")
    with pytest.raises(ValueError, match="one row per item"):
        build_sids(load_config(), tmp_path / "data", tmp_path / "sids", embeddings=np.zeros((3, 4), np.float32))
