"""MFU's FLOP count (tsrec/sft/flops.py) against numbers worked out by hand. (The loop's MFU column on a
GPU: tests/gpu/test_cuda_checks.py::test_sft_on_cuda_reports_mfu.)"""

from __future__ import annotations

from tsrec.sft.flops import FlopModel, flop_model
from tsrec.tiny import build_tiny_model


def test_step_flops_hand_numbers():
    fm = FlopModel(body_params=100, body_trainable=10, hidden=4, vocab=10, head_trainable_rows=2, layers=2, attn_dim=4)
    # body: fwd 2*100*5 + input-grad 2*100*5 + weight-grad of the 10 trainable 2*10*5 = 1000 + 1000 + 100
    # head at 3 supervised positions: fwd 2*4*10*3 + input-grad 240 + weight-grad of 2 rows 2*4*2*3 = 240+240+48
    # attention, causal, per layer: a sample of 3 has 1+2+3 = 6 query-key pairs, of 2 has 3; each pair costs
    #   2*4 (q.k) + 2*4 (p*v) = 16 -> (6+3)*16 = 144 per layer, x2 layers = 288 forward, x3 with backward = 864
    assert fm.step_flops(real_tokens=5, supervised_tokens=3, sample_lengths=[3, 2]) == 2100 + 528 + 864
    # Full fine-tuning of the body and head reduces to the familiar 6 x params x tokens for the matmuls.
    full = FlopModel(body_params=100, body_trainable=100, hidden=4, vocab=10, head_trainable_rows=10, layers=2, attn_dim=4)
    assert full.step_flops(5, 3, []) == 6 * 100 * 5 + 6 * 4 * 10 * 3


def test_flop_model_reads_a_tiny_qwen2_full_and_lora():
    # hidden 16, 4 heads of 4, 2 kv heads (kv width 8), MLP 32, 2 layers, vocab 50, untied.
    # per layer: q 16*16+16, k 16*8+8, v 16*8+8, o 16*16 = 800; MLP 3*16*32 = 1536; 2 norms 32 -> 2368
    # body = 2 * 2368 + final norm 16 = 4752 (embedding and head excluded)
    model = build_tiny_model(50, hidden_size=16, layers=2, tie=False)
    fm = flop_model(model)
    assert fm == FlopModel(body_params=4752, body_trainable=4752, hidden=16, vocab=50, head_trainable_rows=50,
                           layers=2, attn_dim=16)

    from peft import LoraConfig, get_peft_model

    # LoRA r=2 on q (A 16*2 + B 2*16 = 64) and v (A 16*2 + B 2*8 = 48): 112 per layer, 224 trainable.
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                            trainable_token_indices={"model.embed_tokens": [48, 49], "lm_head": [48, 49]}))
    fm = flop_model(lora, head_trainable_rows=2)
    assert fm == FlopModel(body_params=4752 + 224, body_trainable=224, hidden=16, vocab=50, head_trainable_rows=2,
                           layers=2, attn_dim=16)

