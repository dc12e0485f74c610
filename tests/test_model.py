"""`tsrec model init`: SID tokens + SA-Init on the authors' Industrial teacher file (METHOD.md 1.3, 1.5).

Acceptance: every SA-Init row equals an independent NumPy recomputation of the formula (max abs diff
< 1e-5, float32) for depth 1, 2, 3, and rows beyond the depth keep the default initialisation.
"""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared_data import INDUSTRIAL, INDUSTRIAL_TEACHER, require_shared
from tsrec.cli import main
from tsrec.config import load_config
from tsrec.model import init_model
from tsrec.orchestration.semantics import extract_semantics
from tsrec.pretrained import smollm2_hf_dir
from tsrec.sid.index import read_index, token_level


@pytest.fixture(scope="module")
def industrial_semantics(tmp_path_factory):
    """The file engine on the authors' Industrial teacher file + the Industrial index."""
    require_shared(INDUSTRIAL)
    require_shared(INDUSTRIAL_TEACHER)
    out = tmp_path_factory.mktemp("semantics")
    cfg = load_config(overrides=["teacher.engine=file", f"teacher.file={INDUSTRIAL_TEACHER}"])
    stats = extract_semantics(cfg, INDUSTRIAL, INDUSTRIAL, out)
    assert stats["ok"] == 560 and stats["failed"] == 0 and stats["file_extra_tokens"] == []
    return out / "description_keywords.json"


def _numpy_sa_init(table: np.ndarray, records, tok, token_ids) -> np.ndarray:
    """Reference: METHOD.md 1.5 literally, in float64, rho over all rows recomputed before each token."""
    E = table.astype(np.float64).copy()
    for rec in records:
        ids = tok(" ".join(rec["keywords"]), add_special_tokens=False)["input_ids"]
        v = E[ids].mean(axis=0)
        rho = np.linalg.norm(E, axis=1).mean()
        E[token_ids[rec["token"]]] = v * rho / (np.linalg.norm(v) + 1e-6)
    return E


def _init(cfg_overrides, backbone, semantics, out):
    cfg = load_config(overrides=[f"model.backbone={backbone}", *cfg_overrides])
    return init_model(cfg, INDUSTRIAL, semantics, out)


def test_file_engine_output_matches_authors_file(industrial_semantics):
    ours = json.loads(industrial_semantics.read_text())
    theirs = json.loads(INDUSTRIAL_TEACHER.read_text())
    assert ours == theirs  # same records, same order, same key order
    assert list(ours[0]) == ["description", "keywords", "token"]


def test_sa_init_rows_match_formula_for_each_depth(industrial_semantics, tiny_backbone, tmp_path):
    records = json.loads(industrial_semantics.read_text())
    base = _init(["sa_init.depth=0"], tiny_backbone, None, tmp_path / "d0")
    assert base["init_kinds"] == {"mean_resized": 560} and base["tied"] is True
    tok = AutoTokenizer.from_pretrained(tmp_path / "d0")
    E0 = AutoModelForCausalLM.from_pretrained(tmp_path / "d0").get_input_embeddings().weight.detach().numpy()
    sid_tokens = read_index(INDUSTRIAL).all_tokens()
    token_ids = dict(zip(sid_tokens, tok.convert_tokens_to_ids(sid_tokens)))
    assert sorted(token_ids.values()) == list(range(base["vocab_before"], base["vocab_before"] + 560))

    for depth, n_rows in [(1, 48), (2, 304), (3, 560)]:
        stats = _init([f"sa_init.depth={depth}"], tiny_backbone, industrial_semantics, tmp_path / f"d{depth}")
        assert stats["sa_init_rows"] == n_rows and stats["missing_semantics"] == []
        model = AutoModelForCausalLM.from_pretrained(tmp_path / f"d{depth}")
        E = model.get_input_embeddings().weight.detach().numpy()
        assert E.dtype == np.float32
        chosen = [r for r in records if token_level(r["token"]) < depth]
        ref = _numpy_sa_init(E0, chosen, tok, token_ids)
        init_ids = [token_ids[r["token"]] for r in chosen]
        assert np.abs(E[init_ids] - ref[init_ids]).max() < 1e-5
        # rows beyond the depth and every non-SID row keep the default (depth-0) initialisation
        rest = [i for i in range(E.shape[0]) if i not in set(init_ids)]
        assert np.array_equal(E[rest], E0[rest])
        # tied: the LM head is the same table
        assert np.array_equal(model.get_output_embeddings().weight.detach().numpy(), E)
        report = json.loads((tmp_path / f"d{depth}" / "init_report.json").read_text())
        assert sum(r["init"] == "sa_init" for r in report["rows"]) == n_rows
        assert {r["init"] for r in report["rows"] if r["level"] >= depth} <= {"mean_resized"}


def test_untied_lm_head_option(industrial_semantics, tmp_path):
    """An untied Llama-family backbone: LM-head rows are SA-initialised only with sa_init.init_lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsrec.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["heavy duty staples"])
    src = tmp_path / "untied"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(src)
    tok.save_pretrained(src)
    common = ["sa_init.depth=1", "model.mean_resizing=false"]
    off = _init(common, src, industrial_semantics, tmp_path / "off")
    on = _init([*common, "sa_init.init_lm_head=true"], src, industrial_semantics, tmp_path / "on")
    assert off["tied"] is False and off["init_lm_head"] is False and on["init_lm_head"] is True
    assert off["init_kinds"]["random_resized"] == 560 - 48
    m_off = AutoModelForCausalLM.from_pretrained(tmp_path / "off")
    m_on = AutoModelForCausalLM.from_pretrained(tmp_path / "on")
    assert torch.equal(m_off.get_input_embeddings().weight, m_on.get_input_embeddings().weight)
    t = AutoTokenizer.from_pretrained(tmp_path / "on")
    a_ids = t.convert_tokens_to_ids([r["token"] for r in json.loads(industrial_semantics.read_text())[:48]])
    head_off, head_on = m_off.get_output_embeddings().weight, m_on.get_output_embeddings().weight
    assert not torch.equal(head_off[a_ids], head_on[a_ids])  # LM-head rows SA-initialised only with the option
    other = [i for i in range(head_on.shape[0]) if i not in set(a_ids)]
    assert torch.equal(head_off[other], head_on[other])


def test_description_source_and_missing_semantics(tiny_backbone, tmp_path):
    require_shared(INDUSTRIAL_TEACHER)
    records = json.loads(INDUSTRIAL_TEACHER.read_text())
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps([r for r in records if r["token"] != "<a_42>"]))
    stats = _init(["sa_init.depth=1", "sa_init.source=description"], tiny_backbone, partial, tmp_path / "m")
    assert stats["missing_semantics"] == ["<a_42>"] and stats["sa_init_rows"] == 47
    report = json.loads((tmp_path / "m" / "init_report.json").read_text())
    assert next(r for r in report["rows"] if r["token"] == "<a_42>")["init"] == "mean_resized"


def test_cli_model_init_tiny(industrial_semantics, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["model", "init", "--sids", str(INDUSTRIAL), "--semantics", str(industrial_semantics), "--depth", "2",
               "--out", str(out), "model.tiny=true"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["sa_init_rows"] == 304 and stats["backbone"] == "tiny-qwen2"
    assert (out / "manifest.json").exists() and (out / "config.json").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("<a_236><b_231>", add_special_tokens=False)["input_ids"]) == ["<a_236>", "<b_231>"]
    assert main(["model", "init", "--sids", str(INDUSTRIAL), "--depth", "1", "--out", str(tmp_path / "x"),
                 "model.tiny=true"]) == 2  # depth > 0 without a teacher file is a named input error


def test_default_backbone_smollm2(industrial_semantics, tmp_path):
    """Default backbone (SmolLM2-135M-Instruct, Llama family, converted from GGUF): saves as a plain HF folder."""
    stats = init_model(load_config(overrides=["sa_init.depth=1"]), INDUSTRIAL, industrial_semantics, tmp_path / "smol")
    assert stats["vocab_before"] == 49152 and stats["vocab_after"] == 49152 + 560 and stats["tied"] is True
    assert stats["init_kinds"] == {"sa_init": 48, "mean_resized": 512}
    config = json.loads((tmp_path / "smol" / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152 + 560
    tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
    rec = json.loads(industrial_semantics.read_text())[0]
    row = AutoModelForCausalLM.from_pretrained(tmp_path / "smol").get_input_embeddings().weight[
        tok.convert_tokens_to_ids(rec["token"])].detach().numpy()
    E = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir()).get_input_embeddings().weight.detach().numpy()
    v = E.astype(np.float64)[tok(" ".join(rec["keywords"]), add_special_tokens=False)["input_ids"]].mean(0)
    # the first record's row points along the mean keyword embedding (its scale depends on the resized rows)
    assert np.allclose(row / np.linalg.norm(row), v / np.linalg.norm(v), atol=1e-5)


def test_tiny_tokenizer_trained_on_catalogue_titles(tmp_path):
    """model.tiny_tokenizer_titles reads the titles of the items file named in the SID manifest: a title
    then costs far fewer tokens; the tiny size keys reach the model; a missing items file is an InputError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tsrec.artifacts import InputError, write_manifest

    titles = [f"Gorilla GO{100 + i}X Waterproof Epoxy Super Glue Gel, 20 Gram (Pack of {i % 4 + 1})" for i in range(12)]
    items = tmp_path / "data" / "items.parquet"
    items.parent.mkdir()
    pq.write_table(pa.table({"item_id": list(range(12)), "title": titles}), items)
    sids = tmp_path / "sids"
    sids.mkdir()
    (sids / "index.json").write_text(json.dumps({str(i): [f"<a_{i % 3}>", f"<b_{i}>"] for i in range(12)}))
    write_manifest(sids, "sid", {}, inputs={"items": items})
    cfg = load_config(overrides=["model.tiny=true", "sa_init.depth=0", "model.tiny_tokenizer_titles=true",
                                 "model.tiny_vocab_size=1024", "model.tiny_hidden_size=32", "model.tiny_layers=3"])
    init_model(cfg, sids, None, tmp_path / "titled")
    plain = load_config(overrides=["model.tiny=true", "sa_init.depth=0"])
    init_model(plain, sids, None, tmp_path / "plain")
    n_titled = len(AutoTokenizer.from_pretrained(tmp_path / "titled")(titles[0])["input_ids"])
    n_plain = len(AutoTokenizer.from_pretrained(tmp_path / "plain")(titles[0])["input_ids"])
    assert 2 * n_titled <= n_plain, (n_titled, n_plain)  # measured: 22 vs 56 tokens
    config = json.loads((tmp_path / "titled" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 3)

    items.unlink()
    with pytest.raises(InputError, match="tiny_tokenizer_titles"):
        init_model(cfg, sids, None, tmp_path / "missing")


def test_tiny_tokenizer_keeps_prompt_words_whole_beside_many_titles(tmp_path):
    # Every SFT row carries the preamble: `tsrec model init` weights it like the catalogue, so its words are whole
    # pieces. Counted once beside thousands of titles, BPE spent its merges on title words and split the preamble
    # ("d es c ri b es"): 154 tokens per Industrial next-SID row instead of 104.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tsrec import prompts
    from tsrec.artifacts import write_manifest

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 6)) for _ in range(400)]
    titles = [" ".join(rng.choice(words, 6)) for _ in range(2000)]
    items = tmp_path / "data" / "items.parquet"
    items.parent.mkdir()
    pq.write_table(pa.table({"item_id": list(range(len(titles))), "title": titles}), items)
    sids = tmp_path / "sids"
    sids.mkdir()
    (sids / "index.json").write_text(json.dumps({str(i): [f"<a_{i % 40}>", f"<b_{i // 40}>"] for i in range(2000)}))
    write_manifest(sids, "sid", {}, inputs={"items": items})
    cfg = load_config(overrides=["model.tiny=true", "sa_init.depth=0", "model.tiny_tokenizer_titles=true",
                                 "model.tiny_vocab_size=800"])
    init_model(cfg, sids, None, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    n_words = len(prompts.PREAMBLE.split())
    n_pieces = len(tok(prompts.PREAMBLE)["input_ids"])
    # Measured 33 pieces for 26 words ("." "," "###" ":" and newlines are pieces of their own); 116 unweighted.
    assert n_pieces <= n_words + 10, (n_pieces, n_words)
