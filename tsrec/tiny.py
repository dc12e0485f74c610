"""Tiny real components built from a config, for tests, benchmarks and the CPU demo.

No hub access: the tokenizer is a byte-level BPE trained here on the prompt templates and the given
texts; the model is a small random Qwen2 (about 100k-1M parameters). Both save and reload through
``AutoTokenizer`` / ``AutoModelForCausalLM`` like any Hugging Face folder.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tsrec import prompts

EOS = "<|endoftext|>"


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512, template_weight: int = 1):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with EOS = PAD = ``<|endoftext|>``, no BOS.

    The prompt templates count ``template_weight`` times in the BPE corpus: ``tsrec model init`` passes the number
    of catalogue titles (``model.tiny_tokenizer_titles``); 1 (each template once) keeps the test fixtures' and
    benchmarks' tokenizers as they were measured.
    ``padding_side="left"`` is passed to the constructor because setting it later is not saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    fixed = [prompts.PREAMBLE, prompts.INPUT_HEADER, prompts.RESPONSE_HEADER]
    fixed += [instr + " " + tmpl for instr, tmpl in prompts.TEMPLATES.values()]
    corpus = fixed * max(1, template_weight) + texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, padding_side="left")


def build_tiny_model(vocab_size: int, hidden_size: int = 64, layers: int = 2, seed: int = 0, tie: bool = True):
    """A random ``Qwen2ForCausalLM`` with ``vocab_size`` rows (call ``resize_token_embeddings`` after adding tokens)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def save_tiny_backbone(out_dir: str | Path, texts: Iterable[str] = (), seed: int = 0, hidden_size: int = 64) -> Path:
    """Write a tiny tokenizer + model folder (no SID tokens yet) and return its path."""
    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer(texts)
    model = build_tiny_model(len(tok), hidden_size=hidden_size, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def add_sid_tokens(tokenizer, model, sid_tokens: Iterable[str]) -> list[int]:
    """Add SID tokens as ordinary added tokens (string-sorted, METHOD.md 1.3) and resize the embeddings.

    Returns the new token ids in the order added. Used by tiny test models; ``tsrec.model`` does the
    same for real backbones (plus SA-Init).
    """
    toks = sorted(set(sid_tokens))
    tokenizer.add_tokens(toks)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokenizer.convert_tokens_to_ids(toks)


def save_tiny_sid_model(out_dir: str | Path, sid_tokens: Iterable[str], texts: Iterable[str] = (), seed: int = 0,
                        hidden_size: int = 64, layers: int = 2) -> Path:
    """A tiny tokenizer + Qwen2 folder that already has ``sid_tokens`` in its vocabulary."""
    out_dir = Path(out_dir)
    tok = build_tiny_tokenizer(texts)
    model = build_tiny_model(len(tok), hidden_size=hidden_size, layers=layers, seed=seed)
    add_sid_tokens(tok, model, sid_tokens)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
