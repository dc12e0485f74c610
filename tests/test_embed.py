"""Item text embedding (METHOD.md 1.2): text building, masked mean pooling, determinism, Ray Data parity."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from tsrec.config import load_config
from tsrec.embed import TextEncoder, clean_text, item_texts, masked_mean_pool

TEXTS = [
    "Stanley TRA708T Sharpshooter 1/2-Inch Leg Length Staples, Steel (1000 Count)",
    "Gorilla Original Gorilla Glue, Waterproof Polyurethane Glue, 8 ounce Bottle, Brown " * 6,
    "tape",
    "Grizzly G9849 Magnetic Base/Dial Indicator Combo - President's Special",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(batch_size=4, max_length=64, device="cpu")


def test_item_texts_follow_method_1_2():
    items = pa.table(
        {
            "item_id": [0, 1, 2, 3],
            "title": ['A <b>"bold"</b> title', "B\nline", "", ""],
            "description": ["['first', \"it's\"]\r\n", "", "<p>only desc</p>", ""],
        }
    )
    assert clean_text('<a href="x">x</a> "q"\n\r') == "x q"
    assert item_texts(items) == ["A bold title ['first', it's]", "Bline ", " only desc", "unknown item"]
    assert item_texts(items, "title") == ["A bold title", "Bline", "unknown item", "unknown item"]
    # MiniOneRec sources keep the stringified list in description_raw: that one is embedded.
    with_raw = items.append_column("description_raw", pa.array(["['raw']", "", "", ""]))
    assert item_texts(with_raw)[0] == "A bold title ['raw']"


def test_masked_mean_pool_equals_manual_loop():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    manual = torch.stack([hidden[b, : int(mask[b].sum())].mean(dim=0) for b in range(3)])
    torch.testing.assert_close(masked_mean_pool(hidden, mask), manual)
    # Garbage in padded positions changes nothing.
    noisy = hidden + (1 - mask).unsqueeze(-1) * 1e3
    torch.testing.assert_close(masked_mean_pool(noisy, mask), manual)


def test_encoder_pools_over_real_tokens_and_padding_does_not_matter(encoder):
    tok, model = encoder.tokenizer, encoder.model
    enc = tok([TEXTS[2]], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state[0]  # (T, D), no padding at all
    manual = hidden.mean(dim=0).numpy()
    alone = encoder.encode([TEXTS[2]])[0]
    padded = encoder.encode(TEXTS)[2]  # batched with a 64-token text: right-padded to 64
    np.testing.assert_allclose(alone, manual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded, manual, rtol=1e-4, atol=1e-5)
    assert padded.dtype == np.float32 and padded.shape == (encoder.dim,)
    assert not np.isclose(np.linalg.norm(padded), 1.0)  # no L2 normalisation by default


def test_encoder_batch_callable_and_bit_identical_rerun(encoder):
    first = encoder.encode(TEXTS)
    again = encoder.encode(TEXTS)
    assert first.tobytes() == again.tobytes()
    out = encoder({"item_id": np.array([7, 3, 5, 9]), "text": np.array(TEXTS, dtype=object)})
    assert out["item_id"].tolist() == [7, 3, 5, 9]
    np.testing.assert_array_equal(out["embedding"], first)
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_normalize_option():
    enc = TextEncoder(batch_size=4, max_length=32, device="cpu", normalize=True)
    np.testing.assert_allclose(np.linalg.norm(enc.encode(TEXTS[:2]), axis=1), 1.0, rtol=1e-5)


@pytest.mark.ray
def test_ray_data_embedding_matches_in_process(ray_cluster, tmp_path):
    from tsrec.orchestration.embed import embed_items_ray

    n = 64
    rng = np.random.default_rng(0)
    words = ["glue", "tape", "staple", "drill", "steel", "brass", "valve", "sensor", "pipe", "gauge"]
    titles = [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(n)]
    # Shuffled ids: the result must come back in item_id order.
    ids = rng.permutation(n)
    items = pa.table({"item_id": pa.array(ids, pa.int64()), "title": titles, "description": [""] * n})
    cfg = load_config(
        None,
        ["embed.max_length=32", "embed.batch_size=8", "resources.embed.workers=2", "embed.device=cpu"],
    )
    got = embed_items_ray(cfg, items)
    order = np.argsort(ids)
    expected = TextEncoder(batch_size=8, max_length=32, device="cpu").encode([titles[i] for i in order])
    assert got.shape == expected.shape == (n, 384)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
