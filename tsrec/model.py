"""Backbone with SID tokens: vocabulary extension + SA-Init -> a Hugging Face folder (METHOD.md 1.3, 1.5, R11).

Steps:
1. load a local causal LM and its tokenizer (``model.backbone``: HF folder or ``.gguf`` file, with
   ``model.gguf_file`` for a GGUF inside a folder; empty = SmolLM2-135M-Instruct; ``model.tiny`` =
   a tiny random Qwen2 from ``tsrec.tiny``);
2. add every SID token of the index, string-sorted, as ordinary (non-special) added tokens;
3. ``resize_token_embeddings`` to ``max(len(tokenizer), rows)`` with ``model.mean_resizing``
   (transformers' mean resizing, as the public code; seeded with ``run.seed``);
4. SA-Init of the first ``sa_init.depth`` SID levels from the teacher file (``sa_init.source``:
   keywords or description), in float32, in teacher-file order. Tied embeddings: the LM-head row is
   the same tensor and changes too. Untied: LM-head rows keep the resize default unless
   ``sa_init.init_lm_head``, which applies the same formula to the LM-head matrix itself (mean of
   the LM-head rows of the same sub-word ids, rescaled to the LM-head's mean row norm);
5. save model + tokenizer (+ generation_config with pad/eos) with ``init_report.json`` (per SID row:
   id, level, init kind: ``checkpoint_row`` = a pre-existing padding row, ``mean_resized`` /
   ``random_resized`` = created by the resize, ``existing_token`` = already in the tokenizer,
   ``sa_init``), atomically, then ``manifest.json``.

Differs from the public code: the table never shrinks (the public code resizes to len(tokenizer)
even when the checkpoint has more rows; identical for Qwen2.5 + Industrial), and SA-Init runs in fp32.

    tsrec model init --backbone PATH --sids DIR --semantics description_keywords.json --depth 3 --out DIR
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from tsrec.artifacts import InputError, atomic_write_json, staging_dir, write_manifest
from tsrec.config import Config
from tsrec.semantics.records import read_teacher_file
from tsrec.semantics.sa_init import init_text, sa_init_rows, select_records
from tsrec.sid.index import read_index, token_level

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_model(cfg: Config, sids_dir: Path, semantics_file: Path | None, out_dir: Path) -> dict[str, Any]:
    """Build the SID-extended, SA-Initialised backbone and save it as a Hugging Face folder.

    Args:
        cfg: reads ``model``, ``sa_init`` and ``run.seed``.
        sids_dir: SID folder (or file) with the index.
        semantics_file: teacher file (authors' format); required when ``sa_init.depth > 0``.
        out_dir: output folder (model, tokenizer, ``init_report.json``, ``manifest.json``).

    Returns:
        Stats: vocabulary sizes, rows per init kind, tied, depth, SA-Init rows, missing records.

    Raises:
        InputError: depth > 0 without a teacher file, or a bad teacher file / index.
    """
    t0 = time.time()
    depth, source = cfg.sa_init.depth, cfg.sa_init.source
    index = read_index(sids_dir)
    sid_tokens = index.all_tokens()  # string-sorted (METHOD.md 1.3)
    records: list[dict[str, Any]] = []
    if depth > 0 and semantics_file is None:
        raise InputError(str(sids_dir), f"sa_init.depth={depth} needs a teacher file (--semantics)")
    if semantics_file is not None and (depth > 0 or (cfg.model.tiny and cfg.model.tiny_vocab == "smollm2")):
        # the pruned vocabulary covers the teacher text at every depth, so depths differ only in SA-Init
        records = read_teacher_file(semantics_file)

    # --- 1. backbone ---
    tok, model, backbone_name = _load_backbone(cfg, sids_dir, records)
    vocab_before = len(tok)
    rows_before = model.get_input_embeddings().weight.shape[0]

    # --- 2. vocabulary extension: ordinary added tokens, string-sorted ---
    existing = {t for t in sid_tokens if t in tok.get_vocab()}
    tok.add_tokens([t for t in sid_tokens if t not in existing])
    ids = tok.convert_tokens_to_ids(sid_tokens)

    # --- 3. resize (never shrink); mean resizing samples from the global RNG: seed it ---
    torch.manual_seed(cfg.run.seed)
    new_rows = max(len(tok), rows_before)
    if new_rows != rows_before:
        model.resize_token_embeddings(new_rows, mean_resizing=cfg.model.mean_resizing)
    tied = _is_tied(model)
    resized_kind = "mean_resized" if cfg.model.mean_resizing else "random_resized"
    kinds = {t: "existing_token" if t in existing else ("checkpoint_row" if i < rows_before else resized_kind)
             for t, i in zip(sid_tokens, ids)}

    # --- 4. SA-Init of the first `depth` levels, file order ---
    token_ids = dict(zip(sid_tokens, ids))
    chosen = select_records(records, depth)
    extra = [r["token"] for r in chosen if r["token"] not in token_ids]
    chosen = [r for r in chosen if r["token"] in token_ids]
    have = {r["token"] for r in chosen}
    missing = [t for t in sid_tokens if token_level(t) < depth and t not in have]
    if chosen:
        rows = [token_ids[r["token"]] for r in chosen]
        pieces = [list(tok(init_text(r, source), add_special_tokens=False)["input_ids"]) for r in chosen]
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb.copy_(sa_init_rows(emb, rows, pieces))
            if not tied and cfg.sa_init.init_lm_head:
                head = model.get_output_embeddings().weight
                head.copy_(sa_init_rows(head, rows, pieces))
        for r in chosen:
            kinds[r["token"]] = "sa_init"

    # --- 5. save atomically: model, tokenizer, report, manifest last ---
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    counts: dict[str, int] = {}
    for k in kinds.values():
        counts[k] = counts.get(k, 0) + 1
    stats = {
        "backbone": backbone_name, "vocab_before": vocab_before, "rows_before": rows_before, "vocab_after": len(tok),
        "rows_after": model.get_input_embeddings().weight.shape[0], "sid_tokens": len(sid_tokens), "tied": tied,
        "depth": depth, "source": source, "init_lm_head": bool(cfg.sa_init.init_lm_head and not tied),
        "mean_resizing": cfg.model.mean_resizing, "init_kinds": counts, "sa_init_rows": len(chosen),
        "missing_semantics": missing, "semantics_extra_tokens": extra, "dtype": cfg.model.dtype,
    }
    report = {**stats, "rows": [{"token": t, "id": i, "level": token_level(t), "init": kinds[t]}
                                for t, i in zip(sid_tokens, ids)]}
    with staging_dir(out_dir) as stage:
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        atomic_write_json(stage / "init_report.json", report)
        stats["seconds"] = round(time.time() - t0, 3)
        inputs: dict[str, Any] = {"sids": sids_dir}
        if semantics_file is not None:
            inputs["semantics"] = semantics_file
        write_manifest(stage, "model", cfg, inputs=inputs, outputs=["init_report.json", "config.json", "tokenizer.json"],
                       stats=stats, seed=cfg.run.seed)
    return {"out_dir": str(out_dir), **stats}


def _load_backbone(cfg: Config, sids_dir: Path | None = None, records: list[dict[str, Any]] = ()):
    """(tokenizer, model, name) for ``cfg.model``: tiny random Qwen2 (BPE trained here, or SmolLM2's pruned
    vocabulary and projected embeddings), a HF folder or a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.tiny and cfg.model.tiny_vocab == "smollm2":
        from tsrec.pruned_lm import build_pruned_backbone, corpus_texts

        m = cfg.model
        texts = corpus_texts(_catalogue_titles(sids_dir, "model.tiny_vocab=smollm2"), records,
                             sorted(read_index(sids_dir).sids().values()))
        tok, model = build_pruned_backbone(texts, hidden_size=m.tiny_hidden_size, layers=m.tiny_layers,
                                           seed=cfg.run.seed)
        return tok, model.to(dtype), "smollm2-pruned-qwen2"
    if cfg.model.tiny:
        from tsrec.tiny import build_tiny_model, build_tiny_tokenizer

        m = cfg.model
        texts = _catalogue_titles(sids_dir) if m.tiny_tokenizer_titles else []
        # Every training prompt carries the preamble and a template, so the BPE trainer counts them as often as
        # the titles together: counted once beside 3,686 Industrial titles, the preamble tokenized to 65 pieces
        # ("d es c ri b es") and a next-SID row to 154 tokens on average, against 104 weighted (1.2x faster SFT).
        tok = build_tiny_tokenizer(texts, vocab_size=m.tiny_vocab_size, template_weight=max(1, len(texts)))
        model = build_tiny_model(len(tok), hidden_size=m.tiny_hidden_size, layers=m.tiny_layers, seed=cfg.run.seed)
        return tok, model.to(dtype), "tiny-qwen2"
    from tsrec.pretrained import resolve_causal_lm

    folder, gguf = resolve_causal_lm(cfg.model.backbone)
    gguf = cfg.model.gguf_file or gguf
    kw = {"gguf_file": gguf} if gguf else {}
    path = Path(folder)
    if not path.exists():
        raise InputError(path, "backbone folder not found (model.backbone)")
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    quant = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    method = getattr(quant, "quant_method", None)
    if gguf or getattr(method, "value", method) == "gguf":
        # A GGUF-loaded model (or a folder converted from GGUF whose config kept the gguf
        # quantization_config) is flagged as quantized and refuses save_pretrained, although its
        # weights are dequantised: rebuild it from its config and copy the weights.
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantised: save them as a plain model
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        model = plain
    return tok, model, str(path / gguf) if gguf else str(path)


def _catalogue_titles(sids_dir: Path | None, setting: str = "model.tiny_tokenizer_titles") -> list[str]:
    """Item titles of the items file the SIDs were built from (``inputs.items`` of the SID manifest).

    The tiny tokenizer trains on them (``model.tiny_tokenizer_titles``) so that titles are a few
    tokens, as they would be for a real pretrained tokenizer.
    """
    import pyarrow.parquet as pq

    from tsrec.artifacts import read_manifest

    folder = None if sids_dir is None else (sids_dir if sids_dir.is_dir() else sids_dir.parent)
    manifest = read_manifest(folder) if folder is not None and (folder / "manifest.json").exists() else None
    items = ((manifest or {}).get("inputs") or {}).get("items") or {}
    path = Path(items["path"]) if isinstance(items, dict) and items.get("path") else None
    if path is None or not path.exists():
        raise InputError(folder or "<no sids folder>",
                         f"{setting} needs the SID folder's manifest to name an existing items file "
                         "(inputs.items.path)")
    return [str(t) for t in pq.read_table(path, columns=["title"]).column("title").to_pylist()]


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
