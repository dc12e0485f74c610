"""LoRA SFT on tied and untied backbones: the SID rows of the embedding and of the LM head train, the
merged export (no model copy) reproduces the loop's validation loss."""

from __future__ import annotations

import pytest
import torch

from sft_synth import make_tiny_run
from tsrec.config import load_config
from tsrec.runtime import LocalContext
from tsrec.sft.loop import train_sft

BASE = ["sft.global_batch_size=8", "sft.micro_batch_size=4", "sft.lr=3e-2", "sft.warmup_steps=0", "sft.zero_stage=2",
        "sft.precision=fp32", "sft.max_steps=2", "sft.eval_every_steps=2", "sft.save_every_steps=2",
        "sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.dropout=0.0"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("lora_tiny"))


def _model_dir(tiny, root, tie: bool):
    """The tiny run's tokenizer with a fresh tiny Qwen2, tied or untied (Qwen2.5-7B/14B are untied)."""
    from transformers import AutoTokenizer

    from tsrec.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny["model"])
    model = build_tiny_model(len(tok), seed=7, tie=tie)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lora_trains_sid_rows_of_embedding_and_head_and_export_matches(tiny, tmp_path, tie):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsrec.sft.packing import batch_loss, collate
    from tsrec.sft.tasks import build_mixture, tokenize_samples

    model_dir = _model_dir(tiny, tmp_path / "model", tie)
    cfg = load_config(None, BASE)
    result = train_sft(cfg, model_dir, tiny["data"], tiny["sids"], tiny["semantics"], LocalContext(tmp_path / "out"))

    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    assert after.config.tie_word_embeddings == tie
    assert not any("lora" in k or "token_adapter" in k for k in after.state_dict())  # merged on export
    sid = torch.tensor(sorted(i for t, i in tok.get_added_vocab().items() if t.startswith("<a_") or t.startswith("<b_")))
    other = torch.tensor([i for i in range(len(tok)) if i not in set(sid.tolist())])
    for name, get in (("embedding", lambda m: m.get_input_embeddings().weight),
                      ("lm_head", lambda m: m.get_output_embeddings().weight)):
        b, a = get(before).detach(), get(after).detach()
        assert (b[sid] - a[sid]).abs().amax(dim=1).min() > 0, f"{name}: a SID row did not train"
        assert torch.equal(b[other], a[other]), f"{name}: a non-SID row changed"
    if tie:
        assert after.get_output_embeddings().weight.data_ptr() == after.get_input_embeddings().weight.data_ptr()
    q_before = before.model.layers[0].self_attn.q_proj.weight
    q_after = after.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_before, q_after)  # the LoRA delta is folded in
    assert torch.equal(before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight)

    # The exported folder alone reproduces the loop's last validation loss (exported after that eval).
    mix = build_mixture(cfg, tiny["data"], tiny["sids"], tiny["semantics"])
    valid = tokenize_samples(tok, mix.valid, cfg.sft.cutoff_len)
    with torch.no_grad():
        val = batch_loss(after, collate([[s] for s in valid], tok.pad_token_id)).item()
    assert abs(val - result["final_val_loss"]) < 1e-5, (val, result["final_val_loss"])
