"""Issue 9: the enforced quality contract, the resume key, vllm error rows, guided decoding details."""

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from tsrec.config import load_config
from tsrec.semantics.answers import AnswerError, Contract, parse_answer
from tsrec.semantics.guided import BANNED_CHARS, GuidedDecoder, ngram_bans
from tsrec.semantics.teacher import (
    INSTRUCTION_TEXT,
    OUTPUT_COLUMNS,
    PREFILL,
    VllmTeacher,
    contract_of,
    guided_first_of,
    request_rows,
    run_attempts,
    weights_fingerprint,
)

DESC = ("This product family comprises staples, glue and tape for fastening paper, wood and fabric in offices "
        "and workshops. Staplers range from compact desk models to heavy-duty tackers that drive long legs through "
        "thick stacks or upholstery. Adhesives cover white craft glue, fast epoxy, hot-melt sticks and spray mounts. "
        "Tapes include masking, double-sided foam, packing and reinforced filament rolls, with dispensers and "
        "refills sold alongside for everyday repair jobs at home and work.")  # 72 words, no phrase said twice
KWS = [f"fastener type {c}" for c in "abcdefghijklmnopqr"]  # 18 keyphrases
CONTRACT = Contract(instruction=INSTRUCTION_TEXT)


def answer(desc=DESC, kws=KWS):
    return json.dumps({"description": desc, "keywords": kws})


def test_valid_answer_meets_contract():
    desc, kws, _ = parse_answer(answer(), CONTRACT)
    assert kws == KWS and len(desc.split()) == 72


@pytest.mark.parametrize("desc,kws,reason", [
    ("Staples and glue.", KWS, "description has 3 words (contract 55-120)"),
    (DESC + " " + DESC, KWS, "description has 144 words"),
    (DESC, KWS[:5], "5 keywords (contract 15-26)"),
    (DESC, KWS + [f"extra {i}" for i in range(10)], "28 keywords"),
    (DESC, KWS + ["Fastener type A"], "1 duplicate or empty keyword(s)"),
    (DESC, KWS + ["of", "the"], "stopword keyphrase(s) ['of', 'the']"),
    (DESC, KWS + ["BE"], "stopword keyphrase(s) ['BE']"),  # case-insensitive (the demo's teacher wrote 'BE')
    (DESC, KWS + ["very long keyphrase with far too many words"], "1 keyphrase(s) longer than 6 words"),
    (DESC + " See https://example.com for more.", KWS, "URL in the answer"),
    (DESC, KWS + ["www.staples"], "URL in the answer"),
    # one word repeated as a keyphrase (the demo teacher's "Laser Laser Laser Laser Laser Laser"), any case
    (DESC, KWS + ["Laser Laser Laser Laser Laser Laser"], "repeated-word keyphrase(s) ['Laser Laser Laser Laser"),
    (DESC, KWS + ["crystal CRYSTAL"], "repeated-word keyphrase(s) ['crystal CRYSTAL']"),
    # ... and the guided decoder's evasions of that rule (letters appended to the last repeat, 2026-12-06 demo)
    (DESC, KWS + ["Crystal Crystal Crystal Crystal Crystal CrystalCl"], "repeated-word keyphrase(s) ['Crystal"),
    (DESC, KWS + ["Bosch BOSCHBOS"], "repeated-word keyphrase(s) ['Bosch BOSCHBOS']"),
    # a description saying the same thing over and over: a 3-word run occurring 3 or more times
    (("This product family comprises staples and glue for fastening. " * 7).strip(), KWS,
     "description repeats 'this product family' 7 times (contract: a 3-word run at most 2 times)"),
    (DESC[:-1] + ", durable staples and glue, cheap staples and glue, strong staples and glue.", KWS,
     "description repeats 'staples and glue' 3 times"),
    (DESC + " Describe the shared scope and characteristics of this product family.", KWS,
     "copies the instruction ('describe the shared scope and characteristics')"),
])
def test_each_contract_rule_fails_the_record(desc, kws, reason):
    with pytest.raises(AnswerError, match="contract: .*" + __import__("re").escape(reason)):
        parse_answer(answer(desc, kws), CONTRACT)
    parse_answer(answer(desc, kws))  # without a contract (file imports) it is only a warning


def test_keyphrase_problem_is_the_contract_per_keyphrase():
    """The guided decoder refuses to close a keyphrase with these reasons: the same rules as the contract."""
    from tsrec.semantics.answers import keyphrase_problem

    assert keyphrase_problem("BE") == keyphrase_problem("of the") == "stopword keyphrase"
    assert keyphrase_problem("LED") == keyphrase_problem("The Staples") == ""  # case-insensitive both ways
    assert keyphrase_problem("www.staples") == "URL in a keyphrase"
    assert keyphrase_problem("a b c d e f g", 6) == "keyphrase longer than 6 words"
    assert keyphrase_problem("a b c d e f g") == "" and keyphrase_problem("3D printing filament", 6) == ""
    assert keyphrase_problem("Laser Laser") == keyphrase_problem("crystal Crystal CRYSTAL") == "repeated-word keyphrase"
    assert keyphrase_problem("Laser") == keyphrase_problem("laser laser cutter") == ""  # one word, or another word too
    assert keyphrase_problem("PLA PLA PLA PLA PLA PLAPLAPLA") == "repeated-word keyphrase"  # a prefix repeats too
    assert keyphrase_problem("3D 3D printer") == keyphrase_problem("USB USB-C cable") == ""  # under half repeats


def test_repetition_rules_keep_ordinary_answers():
    """The repetition rules flag a description that says the same thing again and again, not one that reuses a
    word or two-word phrase (ordinary prose; the authors' teacher file repeats no 3-word run even twice)."""
    from tsrec.semantics.answers import repeated_run

    assert repeated_run(DESC, 3, 2) == ("", 0)
    twice = DESC + " The staples and glue ship in boxes; staples and glue refills are sold apart."
    assert repeated_run(twice, 3, 2) == ("", 0)  # at most twice is allowed
    assert repeated_run(twice + " Spare staples and glue.", 3, 2) == ("staples and glue", 3)
    assert repeated_run(twice + " Spare staples and glue.", 3, 0) == ("", 0)  # 0 = off
    assert CONTRACT.violations(twice, KWS, KWS) == []


def test_contract_limits_are_config_keys():
    tcfg = load_config(overrides=["teacher.min_keywords=2", "teacher.min_description_words=3",
                                  "teacher.instruction_copy_words=0"]).teacher
    c = contract_of(tcfg)
    assert (c.min_keywords, c.min_words, c.instruction_copy_words) == (2, 3, 0)
    parse_answer(answer("Staples and glue.", KWS[:5]), c)  # passes under the looser limits
    # the opening the guided prompt asks for is not a copy of the instruction
    assert CONTRACT.copied_run("This product family comprises staples designed for offices.") == ""


def test_contract_breach_triggers_the_strict_retry():
    calls = []

    def generate(convs):
        calls.append(convs)
        return [answer(kws=KWS[:3])] if len(calls) == 1 else [answer()[len(PREFILL):]]

    ctx = {"n_items": 1, "items": [["Arrow T50 staple gun", ""]]}
    res = run_attempts([ctx], generate, 2, contract=CONTRACT)[0]
    assert res["status"] == "ok" and res["attempts"] == 2
    assert res["attempt_errors"][0]["error"].startswith("contract: 3 keywords")
    assert "rejected: contract: 3 keywords" in calls[1][0][1]["content"]
    res = run_attempts([ctx], lambda c: [answer(kws=KWS[:3])], 1, contract=CONTRACT)[0]
    assert res["status"] == "failed" and res["error"].startswith("contract: 3 keywords")


def test_guided_first_is_the_default_for_the_default_teacher():
    assert guided_first_of(load_config().teacher) is True
    assert guided_first_of(load_config(overrides=["teacher.model=/m"]).teacher) is False
    assert guided_first_of(load_config(overrides=["teacher.model=/m", "teacher.guided_first=true"]).teacher) is True


# --- resume key -------------------------------------------------------------------------------------


def test_weights_fingerprint_and_request_hash(tmp_path):
    from tsrec.semantics.clusters import build_clusters
    from tsrec.sid.index import SidIndex

    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    weights = np.random.default_rng(0).integers(0, 255, 6 << 20, dtype=np.uint8)  # > 4 MiB: sampled
    (m / "model.safetensors").write_bytes(weights.tobytes())
    fp = weights_fingerprint(m)
    copy = tmp_path / "copy"
    shutil.copytree(m, copy)
    os.utime(copy / "model.safetensors", (1, 1))
    assert weights_fingerprint(copy) == fp  # a copy or a touch is the same teacher
    # one byte in the middle of the data, inside the 9th of the 16 sampled 64 KiB windows (a fine-tune changes
    # every tensor, so every window; a change between windows only would go unseen: documented)
    weights[((6 << 20) - (64 << 10)) * 8 // 15 + 10] ^= 1
    (copy / "model.safetensors").write_bytes(weights.tobytes())
    assert weights_fingerprint(copy) != fp
    (copy / "config.json").write_text('{"a": 1}')
    assert weights_fingerprint(copy) != weights_fingerprint(m)

    clusters = build_clusters(SidIndex({0: ["<a_0>"]}), 40, 0)
    tcfg = load_config().teacher
    h = [request_rows(clusters, {0: "staples"}, {}, tcfg, "hf", "m", w)[0]["request_hash"] for w in (fp, "other")]
    assert h[0] != h[1]


@pytest.mark.parametrize("retry,temperature,keeps", [
    (True, 0.0, True), (True, 0.7, False), ("force", 0.0, False), (False, 0.7, True)])
def test_greedy_failures_are_not_rerequested(retry, temperature, keeps):
    from tsrec.orchestration.semantics import keeps_failures

    value = "force" if retry == "force" else str(retry).lower()
    tcfg = load_config(overrides=[f"teacher.retry_failed={value}", f"teacher.temperature={temperature}"]).teacher
    assert keeps_failures(tcfg) is keeps


# --- vllm: rows that vLLM fails -----------------------------------------------------------------------


def _vllm_rows(teacher, n):
    ctx = json.dumps({"n_items": 1, "items": [["Arrow T50 staple gun", ""]]})
    return [teacher.preprocess({"token": f"<a_{i}>", "level": 0, "n_items": 1, "sample_item_ids": "[0]",
                                "request_hash": f"h{i}", "context": ctx, "attempt": 1, "attempt_errors": "[]"})
            for i in range(n)]


@pytest.mark.ray
def test_vllm_error_rows_become_failed_records(ray_cluster):
    """Rows shaped as Ray 2.60's vLLM stage returns them, through Ray's own postprocess wrapper and real blocks:
    a block of only error rows and a mixed block both end as records; the merge sees no NaN."""
    import ray
    from ray.llm._internal.batch.stages.base import wrap_postprocess

    from tsrec.orchestration.semantics import _merge, finish_vllm_batch

    teacher = VllmTeacher("m", max_attempts=2, contract=Contract().__dict__.copy())
    data = []
    for i, row in enumerate(_vllm_rows(teacher, 4)):
        if i < 3:  # what vllm_engine_stage returns for an exception with should_continue_on_error
            out = {**row, "prompt": "x" * 50, "prompt_token_ids": None, "num_input_tokens": 0, "generated_text": None,
                   "request_id": -1, "time_taken_llm": -1, "params": "",
                   "__inference_error__": "ValueError: prompt (5000 tokens) is longer than max_model_len 4096"}
        else:
            out = {**row, "generated_text": answer(), "request_id": 3, "time_taken_llm": 0.1,
                   "params": "", "__inference_error__": ""}
        data.append({"__data": out})
    post = wrap_postprocess(teacher.postprocess, "__data", include_error_column=True)
    ds = ray.data.from_items(data, override_num_blocks=2).map(post)  # blocks: [err, err] and [err, ok]
    # Ray Data does not keep block order by default: sort the blocks by whether any row succeeded.
    blocks = sorted(ds.iter_batches(batch_size=None, batch_format="pandas"), key=lambda b: "status" in b)
    assert len(blocks) == 2 and "status" not in blocks[0] and blocks[1]["status"].isna().sum() == 1
    done = pd.concat([finish_vllm_batch(b, teacher)[0] for b in blocks], ignore_index=True)
    assert list(done.columns) == list(OUTPUT_COLUMNS) and len(done) == 4
    failed = done[done["status"] == "failed"]
    assert sorted(failed["token"]) == ["<a_0>", "<a_1>", "<a_2>"]
    assert failed["error"].str.startswith("engine error: ValueError: prompt (5000 tokens)").all()
    assert (failed["attempts"] == 1).all() and done["attempts"].dtype == np.int64
    assert json.loads(failed["attempt_errors"].iloc[0])[0]["error"].startswith("engine error")
    assert done.loc[done["token"] == "<a_3>", "status"].item() == "ok"
    rows = [{"token": f"<a_{i}>", "request_hash": f"h{i}"} for i in range(4)]
    merged = _merge(done.assign(part_order=0), rows)
    assert merged["attempts"].notna().all() and merged["status"].notna().all() and len(merged) == 4


def test_vllm_settings_structured_outputs_and_gpu_check():
    from tsrec.orchestration.semantics import check_vllm_resources

    cfg = load_config(overrides=["teacher.engine=vllm", "teacher.tensor_parallel_size=2", "teacher.concurrency=2",
                                 "teacher.accelerator_type=H100", "teacher.runtime_env={env_vars: {A: b}}"])
    t = VllmTeacher(**VllmTeacher.constructor_kwargs(cfg.teacher, 0, "m", 2))
    kw = t.processor_config_kwargs()
    assert kw["accelerator_type"] == "H100" and kw["runtime_env"] == {"env_vars": {"A": "b"}}
    schema = t.sampling_params()["structured_outputs"]["json"]
    assert schema["properties"]["keywords"]["minItems"] == 15 and schema["required"] == ["description", "keywords"]
    assert t.preprocess(_vllm_rows(t, 1)[0] | {"attempt_errors": "[]"})["messages"][-1]["role"] == "user"
    with pytest.raises(RuntimeError, match=r"needs 4 GPU\(s\) \(tensor_parallel_size=2 x concurrency=2\).*has 3"):
        check_vllm_resources(cfg, {"GPU": 3, "accelerator_type:H100": 1})
    with pytest.raises(RuntimeError, match="accelerator_type='H100'"):
        check_vllm_resources(cfg, {"GPU": 4, "accelerator_type:A10G": 1})
    check_vllm_resources(cfg, {"GPU": 4, "accelerator_type:H100": 1})


# --- guided decoding ----------------------------------------------------------------------------------


def test_ngram_bans_look_at_the_answer_only():
    assert ngram_bans([5, 6, 7, 5, 6], 3) == [7]  # "5 6" was followed by 7
    assert ngram_bans([5, 6], 3) == [] and ngram_bans([1, 2, 1], 0) == []
    assert not any(d in BANNED_CHARS for d in "0123456789")  # "3D", "12V" can be written


def test_guided_keywords_batched_equals_one_by_one(tiny_backbone, monkeypatch):
    """The lockstep keyword phase on the description's KV cache gives each row what it gives alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tsrec.semantics.guided as guided

    # A random tiny model writes no sentence end: keep its capped text whole so the keyword phase runs.
    monkeypatch.setattr(guided, "cut_at_sentence", lambda text: text.strip())

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone), padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(tiny_backbone)).eval()
    dec = GuidedDecoder(model, tok, description_tokens=10, keyword_tokens=3, max_keywords=4, min_keywords=1,
                        min_description_tokens=4)
    prompts = ["heavy duty staples glue tape " + PREFILL, "glue " + PREFILL]
    both = dec(prompts)
    alone = [dec([p])[0] for p in prompts]
    assert [r.raw for r in both] == [r.raw for r in alone]
    assert any('"keywords"' in r.raw for r in both)
