"""cura.memory.flops: the model FLOPs of a LoRA step (the MFU numerator), against a count by hand."""

from cura.memory.flops import lora_step_flops
from cura.memory.shapes import ModelShape

TINY = ModelShape(
    name="tiny", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=2, tie_word_embeddings=True,
)  # fmt: skip


def test_tiny_config_counted_by_hand():
    # 1 x 3 tokens, LoRA r=1 on q_proj only. Linear weights k*m: q 4*4, k 4*2, v 4*2, o 4*4, gate/up/down 4*8.
    weights = 16 + 8 + 8 + 16 + 32 + 32 + 32  # 144
    linear_pass = 2 * 3 * weights  # one matmul pass over the 3 tokens: 864
    # causal attention: pairs (t, s<=t) = 1 + 2 + 3 = 6; QK^T and PV, 2 heads of dim 2: 2 * 2 * 2 * 2 * 6
    attention_fwd = 96
    lora_fwd = 2 * 3 * 1 * (4 + 4)  # x A^T (3x4 @ 4x1) and (.) B^T (3x1 @ 1x4): 48
    head = 2 * 2 * 1 * 2 * 4 * 10  # forward + input gradient on the 2 predicted positions: 320

    f = lora_step_flops(TINY, batch=1, seq_len=3, r=1, targets=("q_proj",), checkpointing=True)
    assert f.linear == 3 * linear_pass  # forward, recomputation, input gradient: 2592
    assert f.attention == 4 * attention_fwd  # forward, recomputation, backward (2x): 384
    assert f.lora == 5 * lora_fwd  # forward, recomputation, input grad, 2 weight grads: 240
    assert f.head == head
    assert f.total == 2592 + 384 + 240 + 320

    g = lora_step_flops(TINY, batch=1, seq_len=3, r=1, targets=("q_proj",), checkpointing=False)
    assert (g.linear, g.attention, g.lora, g.head) == (2 * linear_pass, 3 * attention_fwd, 4 * lora_fwd, head)


def test_scales_with_layers_batch_and_rank():
    one = lora_step_flops(TINY, batch=2, seq_len=5, r=2)
    deeper = lora_step_flops(ModelShape(**{**TINY.__dict__, "num_layers": 3}), batch=2, seq_len=5, r=2)
    assert (deeper.linear, deeper.attention, deeper.lora) == (3 * one.linear, 3 * one.attention, 3 * one.lora)
    assert deeper.head == one.head
    assert lora_step_flops(TINY, batch=4, seq_len=5, r=2).total == 2 * lora_step_flops(TINY, 2, 5, 2).total
    assert lora_step_flops(TINY, 2, 5, r=4).lora == 2 * one.lora
