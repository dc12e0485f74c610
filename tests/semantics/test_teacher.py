"""Teacher core: clusters, prompts, answer parsing and the retry path (METHOD.md 1.4). No Ray."""

import json

import numpy as np
import pytest

from tsrec.config import load_config
from tsrec.semantics.clusters import build_clusters, sample_items, token_clusters, token_order
from tsrec.semantics.records import read_teacher_file, validate_record_set
from tsrec.semantics.teacher import (
    PREFILL,
    AnswerError,
    FileTeacher,
    VllmTeacher,
    build_messages,
    parse_answer,
    request_rows,
    run_attempts,
)
from tsrec.sid.index import SidIndex

GOOD = {"description": ("This product family comprises staples, glue and tape for fastening paper, wood and fabric in "
                        "offices and workshops. Staplers range from compact desk models to heavy-duty tackers that drive "
                        "long legs through thick stacks or upholstery. Adhesives cover white craft glue, fast epoxy, "
                        "hot-melt sticks and spray mounts. Tapes include masking, double-sided foam, packing and "
                        "reinforced filament rolls, with dispensers and refills sold alongside for everyday repair jobs "
                        "at home and work."),  # 72 words, no phrase said three times (the contract's repeat rule)
        "keywords": [f"keyword {i}" for i in range(20)]}


def _index():
    return SidIndex({0: ["<a_1>", "<b_0>"], 1: ["<a_0>", "<b_0>"], 2: ["<a_1>", "<b_2>"], 3: ["<a_0>", "<b_1>"]})


def test_clusters_every_level_any_prefix():
    idx = _index()
    assert token_order(idx) == ["<a_1>", "<a_0>", "<b_0>", "<b_2>", "<b_1>"]  # level by level, first appearance
    assert token_clusters(idx)["<b_0>"] == [0, 1]  # shared across the <a_0> and <a_1> prefixes
    ids = list(range(100))
    s1, s2 = sample_items("<a_3>", ids, 10, seed=1), sample_items("<a_3>", ids, 10, seed=1)
    assert s1 == s2 and len(s1) == 10 and s1 == sorted(s1) and s1 != list(range(10))
    assert sample_items("<a_3>", ids, 10, seed=2) != s1 and sample_items("<a_3>", ids, 0, seed=1) == ids
    c = build_clusters(idx, max_items=1, seed=0)
    assert [x.token for x in c] == token_order(idx) and c[2].is_sampled and len(c[2].sample_item_ids) == 1


@pytest.mark.parametrize("text, reason", [
    ('{"description": "Staples and glue", "keywords": ["staples", "gl', "truncated"),
    ("Sure! Here are the keywords: staples, glue.", "no JSON object"),
    ('{"description": "Staples and glue"}', "missing key(s) keywords"),
    ('{"keywords": ["a"]}', "missing key(s) description"),
    ('{"description": "Staples", "keywords": []}', "empty keyword list"),
    ('{"description": "Staples", "keywords": ["", "  "]}', "empty keyword list"),
    ('{"description": "", "keywords": ["a"]}', "description is empty"),
    ('{"description": "Staples", "keywords": "a, b"}', "not a list of strings"),
    ('{"description": "Items with <a_12> share", "keywords": ["a"]}', "SID token"),
    ('["staples"]', "no JSON object"),
])
def test_parse_rejects_malformed_answers(text, reason):
    with pytest.raises(AnswerError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        parse_answer(text)


def test_parse_accepts_prose_fences_and_key_case():
    wrapped = "Here is the JSON you asked for:\n```json\n" + json.dumps(GOOD) + "\n```\nHope this helps!"
    desc, kws, warns = parse_answer(wrapped)
    assert desc == " ".join(GOOD["description"].split()) and kws == GOOD["keywords"]
    assert warns == ["text around the JSON object"]
    desc, kws, warns = parse_answer('{"Description": "Short one.", "Keywords": ["Glue", "glue", " tape "]}')
    assert kws == ["Glue", "tape"]
    assert any("words" in w for w in warns) and any("keywords (contract" in w for w in warns)
    assert any("duplicate" in w for w in warns)
    # a first unrelated object is skipped for the one with the expected keys
    _, kws, _ = parse_answer('{"note": 1} then ' + json.dumps(GOOD))
    assert len(kws) == 20


def test_prompts_normal_and_strict():
    ctx = {"n_items": 50, "items": [["Stanley staples", "Heavy-duty"], ["Gorilla glue", ""]]}
    normal = build_messages(ctx, 1)
    assert [m["role"] for m in normal] == ["system", "user"]
    assert "1. Stanley staples -- Heavy-duty\n2. Gorilla glue\n" in normal[1]["content"]
    assert "a sample of 2 of its 50 products" in normal[1]["content"]
    strict = build_messages(ctx, 2, "empty keyword list")
    assert strict[-1] == {"role": "assistant", "content": PREFILL}
    assert "rejected: empty keyword list" in strict[1]["content"] and "ONLY one JSON object" in strict[1]["content"]


def test_run_attempts_retries_with_strict_prompt_then_reports():
    """A scripted engine: the first answers are malformed; retries see the strict prompt."""
    seen = []
    script = {
        0: ["Sure, here you go: staples, glue", json.dumps(GOOD)[len(PREFILL):]],  # prose, then ok after prefill
        1: ['{"description": "x", "keywords": [', '"keywords": []}'],  # truncated, then still broken
    }

    def generate(convs):
        seen.append(convs)
        return [script[int(c[1]["content"].split("products share")[0].split()[-1]) - 1].pop(0) for c in convs]

    ctxs = [{"n_items": n, "items": [["t", ""]] * n} for n in (1, 2)]
    res = run_attempts(ctxs, generate, max_attempts=2)
    assert [len(c) for c in seen] == [2, 2] and seen[1][0][-1]["role"] == "assistant"
    assert res[0]["status"] == "ok" and res[0]["attempts"] == 2
    assert res[0]["attempt_errors"][0]["error"] == "no JSON object in the answer"
    assert res[1]["status"] == "failed" and res[1]["attempts"] == 2 and res[1]["raw"].startswith(PREFILL)
    assert [e["attempt"] for e in res[1]["attempt_errors"]] == [1, 2] and res[1]["error"]


def _rows(tokens=("<a_1>", "<a_0>")):
    idx = _index()
    clusters = [c for c in build_clusters(idx, 40, 0) if c.token in tokens]
    cfg = load_config()
    return request_rows(clusters, {i: f"item {i}" for i in idx.items}, {}, cfg.teacher, "vllm", "m")


def test_request_hash_tracks_request():
    a, b = _rows(), _rows()
    assert [r["request_hash"] for r in a] == [r["request_hash"] for r in b]
    cfg = load_config(overrides=["teacher.max_new_tokens=7"])
    c = request_rows(build_clusters(_index(), 40, 0)[:2], {i: f"item {i}" for i in range(4)}, {}, cfg.teacher, "vllm", "m")
    assert c[0]["request_hash"] != a[0]["request_hash"]


def test_vllm_config_and_requests():
    # teacher.guided=false: free-form requests with the prefill (structured outputs: tests/semantics/test_contract.py)
    cfg = load_config(overrides=["teacher.engine=vllm", "teacher.batch_size=16", "teacher.tensor_parallel_size=2",
                                 "teacher.max_model_len=2048", "teacher.max_new_tokens=300", "teacher.guided=false"])
    t = VllmTeacher(**VllmTeacher.constructor_kwargs(cfg.teacher, 7, "/models/qwen", concurrency=3))
    kw = t.processor_config_kwargs()
    assert kw["model_source"] == "/models/qwen" and kw["batch_size"] == 16 and kw["concurrency"] == 3
    assert kw["engine_kwargs"]["tensor_parallel_size"] == 2 and kw["engine_kwargs"]["max_model_len"] == 2048
    from ray.data.llm import vLLMEngineProcessorConfig  # builds, never runs (STACK.md 5.2)

    assert vLLMEngineProcessorConfig(**kw).concurrency == 3
    row = {**_rows()[0], "attempt": 1, "attempt_errors": "[]"}
    req = t.preprocess(row)
    assert req["messages"] == build_messages(json.loads(row["context"]), 1)
    assert req["sampling_params"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 300, "repetition_penalty": 1.0}
    # engine answer with prose only -> retry with the strict prompt, then failed at the last attempt
    out = t.postprocess({**req, "generated_text": "I cannot help."})
    assert out["status"] == "retry" and out["error"] == "no JSON object in the answer"
    req2 = t.preprocess({**out, "attempt": 2})
    assert req2["messages"][-1] == {"role": "assistant", "content": PREFILL}
    assert "rejected: no JSON object" in req2["messages"][1]["content"]
    failed = t.postprocess({**req2, "generated_text": "oops"})
    assert failed["status"] == "failed" and failed["attempts"] == 2 and len(json.loads(failed["attempt_errors"])) == 2
    ok = t.postprocess({**req2, "generated_text": json.dumps(GOOD)[len(PREFILL):]})
    assert ok["status"] == "ok" and json.loads(ok["keywords"]) == GOOD["keywords"] and ok["engine"] == "vllm"
    err = t.postprocess({**req, "generated_text": "", "__inference_error__": "CUDA OOM"})
    assert err["status"] == "retry" and "engine error" in err["error"]


def test_file_teacher_and_record_validation(tmp_path):
    recs = [{"token": "<a_1>", "description": "d1", "keywords": ["k"]}, {"token": "<c_9>", "description": "d1", "keywords": ["k"]}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(recs))
    rows = _rows()
    out = FileTeacher(str(path))({k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]})
    assert list(out["status"]) == ["ok", "failed"] and "missing from teacher file" in out["error"][1]
    v = validate_record_set(read_teacher_file(path), ["<a_1>", "<a_0>"])
    assert v["missing"] == ["<a_0>"] and v["extra"] == ["<c_9>"] and v["duplicate_descriptions"] == [["<a_1>", "<c_9>"]]
    path.write_text(json.dumps([{"token": "<a_1>", "description": "d", "keywords": []}]))
    with pytest.raises(Exception, match=r"t.json, line 1, field 'keywords'"):
        read_teacher_file(path)
