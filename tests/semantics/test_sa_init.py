"""SA-Init numerics (METHOD.md 1.5) and TS-Align samples (METHOD.md 1.6)."""

import numpy as np
import pytest
import torch

from tsrec import prompts
from tsrec.semantics.sa_init import init_text, sa_init_rows, select_records
from tsrec.semantics.ts_align import ts_align_samples


def test_sa_init_flat_mean_rescaled_and_rho_over_updated_rows():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(12, 4, generator=g)
    out = sa_init_rows(E, [10, 11], [[0, 1, 1], [10, 2]])  # second record reads the row written by the first
    ref = E.double().numpy().copy()
    for row, ids in [(10, [0, 1, 1]), (11, [10, 2])]:
        v = ref[ids].mean(0)  # flat mean: a piece that occurs twice counts twice
        rho = np.linalg.norm(ref, axis=1).mean()  # over ALL rows as they are now
        ref[row] = v * rho / (np.linalg.norm(v) + 1e-6)
    assert np.abs(out.numpy() - ref).max() < 1e-6
    assert torch.equal(out[:10], E[:10])


def test_sa_init_dtype_roundtrip_and_errors():
    E = torch.randn(6, 3).to(torch.bfloat16)
    out = sa_init_rows(E, [5], [[0, 1]])
    assert out.dtype == torch.bfloat16 and torch.equal(out[:5], E[:5])
    with pytest.raises(ValueError, match="no ids"):
        sa_init_rows(E, [5], [[]])
    with pytest.raises(ValueError, match="outside"):
        sa_init_rows(E, [6], [[0]])


def test_depth_and_source():
    recs = [{"token": t, "description": "d " + t, "keywords": ["red tape", "glue"]} for t in ("<a_1>", "<b_2>", "<c_3>")]
    assert [r["token"] for r in select_records(recs, 2)] == ["<a_1>", "<b_2>"] and select_records(recs, 0) == []
    assert init_text(recs[0], "keywords") == "red tape glue" and init_text(recs[0], "description") == "d <a_1>"
    with pytest.raises(ValueError):
        select_records(recs, 4)


def test_ts_align_two_samples_per_record_exact_strings():
    rec = {"token": "<a_236>", "description": "This product family comprises switches.", "keywords": ["k"]}
    t2d, d2t = ts_align_samples([rec])
    assert t2d.instruction == prompts.PREAMBLE + "Answer the question about item Semantic ID token identification.\n"
    assert t2d.user_input == ("### User Input: \nWhat is the typical scope and shared features of items that contain "
                              "the token: <a_236>?\n\n### Response:\n")
    assert t2d.target == rec["description"] and d2t.target == "<a_236>"
    assert d2t.user_input == ('### User Input: \nWhat token do the items that have the following scope and shared '
                              'characteristics contain: "This product family comprises switches."?\n\n### Response:\n')
    assert [s.task for s in ts_align_samples([rec, rec])] == ["token_to_description", "description_to_token"] * 2
