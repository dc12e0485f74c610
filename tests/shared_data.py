"""Paths of the data under ../shared/data that tests read (never copied into the repo)."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
INDUSTRIAL = SHARED_DATA / "amazon" / "Industrial_and_Scientific"
INDUSTRIAL_TEACHER = SHARED_DATA / "tsrec" / "Industrial_and_Scientific" / "Industrial_and_Scientific.description_keywords.json"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


def assert_greedy_generate(model, tok, text: str, max_new_tokens: int):
    """``generate`` of an exported model continues ``text`` with exactly the greedy chain of its own logits.

    An independent expectation (one full forward per step, argmax), so an export whose generation
    config changes greedy decoding (sampling, penalties, a wrong EOS) or whose weights do not produce
    the continuation fails; exactly ``max_new_tokens`` tokens come unless the chain reaches EOS.
    Returns the new token ids.
    """
    import torch

    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        ids = enc["input_ids"]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax().view(1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tok.eos_token_id:
                break
    assert out.tolist() == ids.tolist(), (tok.decode(out[0]), tok.decode(ids[0]))
    return out[0, enc["input_ids"].shape[1]:].tolist()
