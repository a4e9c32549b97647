"""cura.nn.dropout: the hashed-mask LoRA dropout against its PyTorch reference, torch's dropout statistics,
autograd, checkpoint recomputation and the LoRA layer that uses it."""

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cura.nn.dropout import LoRADropout, hash_dropout, reference_dropout, reference_keep
from cura.nn.lora import LoRALinear
from cura.quant import kernels

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (torch's own casts differ in NaN payloads)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(
        a.view(BITS[a.dtype])[~nan], b.view(BITS[b.dtype])[~nan]
    )


@pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the reference is what runs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_the_reference_bit_for_bit(dtype):
    x = torch.randn(301, 257, generator=torch.Generator().manual_seed(1)).to(dtype)  # odd size: a short chunk
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    for seed in (0, 987654321987, 2**64 - 1):
        for p in (0.05, 0.5):
            assert same_bits(hash_dropout(x, seed, p), reference_dropout(x, seed, p)), (dtype, seed, p)


def test_mask_statistics_are_those_of_bernoulli_dropout():
    n, p = 1 << 20, 0.1
    keep = reference_keep(n, 12345, p).float()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs((1 - keep.mean()) - p) < 5 * sd  # drop rate p
    # neighbours and far elements are uncorrelated (the hash mixes the index)
    for lag in (1, 2, 64, 4096):
        a, b = keep[:-lag] - keep.mean(), keep[lag:] - keep.mean()
        corr = (a * b).mean() / keep.var()
        assert abs(corr) < 5 / math.sqrt(n), lag
    # different seeds give (nearly) independent masks
    other = reference_keep(n, 12346, p).float()
    assert abs(((keep - keep.mean()) * (other - other.mean())).mean() / keep.var()) < 5 / math.sqrt(n)


def test_kept_values_are_scaled_and_dropped_ones_are_zero():
    x = torch.randn(64, 100)
    y = reference_dropout(x, 7, 0.25)
    keep = reference_keep(x.numel(), 7, 0.25).view(x.shape)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    assert torch.equal(y[keep], x[keep] * torch.tensor(1 / 0.75, dtype=torch.float32))


def test_backward_multiplies_the_gradient_by_the_same_mask():
    layer = LoRADropout(0.3)
    x = torch.randn(33, 65, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    scale = torch.tensor(1 / 0.7, dtype=torch.float32)
    factor = (y != 0).float() * scale  # x has no zeros, so y == 0 exactly where dropped
    assert torch.equal(x.grad, g * factor)


def test_eval_and_p0_are_the_identity_and_training_draws_fresh_masks():
    layer = LoRADropout(0.5)
    x = torch.randn(8, 16)
    assert layer.eval()(x) is x
    assert LoRADropout(0.0).train()(x) is x
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_the_seed_comes_from_torch_so_manual_seed_and_checkpointing_replay_it():
    layer = LoRADropout(0.2).train()
    x = torch.randn(16, 32)
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), a)

    # under non-reentrant checkpointing the recomputation must see the forward's mask
    w = torch.randn(32, 8, requires_grad=True)
    xin = torch.randn(16, 32, requires_grad=True)

    def f(t):
        return layer(t) @ w

    torch.manual_seed(9)
    ref = f(xin)
    ref.sum().backward()
    g_ref = xin.grad.clone(), w.grad.clone()
    xin.grad, w.grad = None, None
    torch.manual_seed(9)
    out = checkpoint(f, xin, use_reentrant=False)
    out.sum().backward()
    assert torch.equal(out, ref) and torch.equal(xin.grad, g_ref[0]) and torch.equal(w.grad, g_ref[1])


def test_lora_layer_uses_it_and_matches_the_formula():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 24), r=4, alpha=8.0, dropout=0.5)
    assert isinstance(layer.lora_dropout, LoRADropout) and isinstance(layer.lora_dropout, nn.Dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 32)
    torch.manual_seed(11)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)
    expected = layer.base_layer(x) + layer.scaling * (
        reference_dropout(x, seed, 0.5) @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    )
    torch.manual_seed(11)
    torch.testing.assert_close(layer.train()(x), expected, rtol=1e-6, atol=1e-6)


def _attention_like(dropout: float):
    """Three LoRA layers over one input, grouped as attach_lora groups q/k/v."""
    from cura.adapters.attach import group_shared_inputs

    torch.manual_seed(0)
    block = nn.Module()
    for name, out in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
        layer = LoRALinear(nn.Linear(16, out), r=2, alpha=4.0, dropout=dropout)
        with torch.no_grad():
            layer.lora_B.weight.normal_()
        setattr(block, name, layer)
    groups = group_shared_inputs(block, ["q_proj", "k_proj", "v_proj"])
    return block, groups


def test_shared_input_group_is_one_mask_and_one_matmul_with_the_same_result_and_gradients():
    block, groups = _attention_like(0.3)
    assert groups == 1
    layers = [block.q_proj, block.k_proj, block.v_proj]
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.manual_seed(21)
    outs = [layer(x) for layer in layers]
    sum(o.square().sum() for o in outs).backward()
    got = [x.grad.clone()] + [
        p.grad.clone() for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)
    ]

    # by hand: one seed drawn, the same mask for all three, each layer's own A and B
    torch.manual_seed(21)
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)
    x.grad = None
    for layer in layers:
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.grad = None
    dropped = reference_dropout(x, seed, 0.3)
    refs = [
        layer.base_layer(x) + layer.scaling * (dropped @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
        for layer in layers
    ]
    sum(o.square().sum() for o in refs).backward()
    want = [x.grad] + [p.grad for layer in layers for p in (layer.lora_A.weight, layer.lora_B.weight)]
    for a, b in zip(outs, refs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):  # x.grad: the three paths summed inside one matmul, in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_sibling_on_another_input_computes_alone():
    block, _ = _attention_like(0.3)
    x, other = torch.randn(4, 16), torch.randn(4, 16)
    torch.manual_seed(1)
    block.q_proj(x)  # leaves k's and v's slices for x
    y = block.k_proj(other)  # another tensor: its own mask and matmul, not q's slice
    block.k_proj.shared_input = None
    torch.manual_seed(2)
    alone = block.k_proj(other)
    assert not torch.equal(y, block.k_proj.base_layer(other))  # dropout and B are applied
    assert y.shape == alone.shape


def test_no_groups_without_dropout_so_each_layer_computes_as_peft_does():
    block, groups = _attention_like(0.0)
    assert groups == 0 and block.q_proj.shared_input is None


def test_a_grouped_model_deep_copies_and_pickles_with_its_own_group():
    import copy
    import io

    block, _ = _attention_like(0.3)
    block.q_proj(torch.randn(2, 16))  # leaves slices pending
    twin = copy.deepcopy(block)
    assert twin.q_proj.shared_input is twin.k_proj.shared_input is not block.q_proj.shared_input
    assert twin.q_proj.shared_input.members == [twin.q_proj, twin.k_proj, twin.v_proj]
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.v_proj.shared_input.members[2] is loaded.v_proj
