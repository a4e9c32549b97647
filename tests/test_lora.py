"""LoRALinear: the formula, PEFT parity on every tiny architecture, init, freezing, gradients, rsLoRA."""

from __future__ import annotations

import math

import peft
import torch
from torch import nn

from bnb_ref import float_path
from cura.adapters import LoraConfig, adapter_state_dict, attach_lora, lora_layers
from cura.nn.linear4bit import Linear4bit, dequantize_model, quantize_model
from cura.nn.lora import LoRALinear
from cura.quant import quantize
from tiny import tiny_model


def _randomize_lora(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def _peft_twin(arch: str, model: nn.Module, r: int, alpha: float, use_rslora: bool = False):
    """A PEFT model on an identical base, carrying the same A/B weights as cura's `model`."""
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", use_rslora=use_rslora
    )
    twin = peft.get_peft_model(tiny_model(arch), config)
    result = peft.set_peft_model_state_dict(twin, adapter_state_dict(model))
    assert not [k for k in result.missing_keys if "lora_" in k]
    return twin.eval()


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_formula_on_a_plain_linear():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    expected = base(x) + (alpha_over_r := 2.0) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert layer.scaling == alpha_over_r
    torch.testing.assert_close(layer(x), expected)
    assert [k for k, _ in layer.named_parameters()] == [
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
    ]


def test_init_matches_peft_distribution():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 64), r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on fan_in 256
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound


def test_rslora_scaling_and_peft_parity():
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=8.0, use_rslora=True).scaling == 2.0
    assert LoRALinear(nn.Linear(4, 4), r=16, alpha=8.0).scaling == 0.5
    model = tiny_model("llama")
    attach_lora(model, LoraConfig(r=16, alpha=8.0, dropout=0.0, use_rslora=True))
    _randomize_lora(model)
    twin = _peft_twin("llama", model, r=16, alpha=8.0, use_rslora=True)
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, twin(_tokens()).logits)


def test_logits_identical_to_peft(arch):
    model = tiny_model(arch)
    targets = attach_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    _randomize_lora(model)
    twin = _peft_twin(arch, model, r=4, alpha=8.0)
    peft_targets = {
        n.removeprefix("base_model.model.")
        for n, m in twin.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(targets) == peft_targets
    with torch.no_grad():
        ours, theirs, base = (
            model(_tokens()).logits,
            twin(_tokens()).logits,
            tiny_model(arch)(_tokens()).logits,
        )
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, base)  # the adapter really changes the output


def test_fresh_adapter_leaves_the_model_unchanged(arch):
    model, base = tiny_model(arch), tiny_model(arch)
    attach_lora(model, LoraConfig(r=8))
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, base(_tokens()).logits)


def test_only_adapter_weights_train_and_gradients_reach_a_and_b():
    model = tiny_model("llama").train()
    attach_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # llama tiny, per layer in+out: q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64 = 1024
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 1024 * 2
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_layers(model).values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    def loss_and_grads():
        model.zero_grad()
        tokens = _tokens()
        model(tokens, labels=tokens).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    grads = loss_and_grads()
    # B = 0: A's gradient is exactly zero (it flows through B), B's is not
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if ".lora_A." in n)
    assert all(torch.count_nonzero(g) > 0 for n, g in grads.items() if ".lora_B." in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    grads = loss_and_grads()
    assert all(torch.count_nonzero(g) > 0 for g in grads.values())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32), r=4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_lora_weights_are_float32_masters_computed_in_the_base_dtype():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8, dtype=torch.bfloat16), r=2, alpha=4, dropout=0.0)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    a, b = layer.lora_A.weight.bfloat16(), layer.lora_B.weight.bfloat16()  # the update in bf16, like autocast
    # bf16 operands, float32 accumulation, one rounding of base + scale * update (add_update's addmm)
    low_rank = x @ a.t()
    ref = (layer.base_layer(x).float() + 2.0 * (low_rank.float() @ b.float().t())).bfloat16()
    torch.testing.assert_close(y, ref, rtol=2**-8, atol=0)
    peft_order = layer.base_layer(x) + low_rank @ b.t() * 2.0  # three roundings: within a few bf16 ulps
    torch.testing.assert_close(y, peft_order, rtol=0, atol=4 * 2**-8 * peft_order.abs().max().item())
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32


def test_lora_on_a_4bit_base():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=True)
    base = Linear4bit(quantize(dense.weight.detach()), bias=dense.bias.detach())
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    assert [n for n, p in layer.named_parameters() if p.requires_grad][-2:] == [
        "lora_A.weight",
        "lora_B.weight",
    ]
    assert layer.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    ref = base(x) + 2.0 * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert x.grad is not None
    # attach_lora recognises the 4-bit layer as a linear
    model = nn.Sequential()
    model.add_module("q_proj", base)
    assert attach_lora(model, LoraConfig(r=2, target_modules=["q_proj"])) == ["q_proj"]


def _bnb_4bit(model: nn.Module) -> nn.Module:
    """Every linear but lm_head replaced by bitsandbytes' NF4 Linear4bit (the QLoRA reference layer)."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.float32, quant_type="nf4",
                )  # fmt: skip
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4")
                setattr(module, name, q)
    return float_path(model.to("cpu"))  # .to() quantizes


def test_lora_on_bitsandbytes_4bit_base_matches_peft():
    model = _bnb_4bit(tiny_model("llama"))
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8
    base = model(_tokens()).logits.detach()
    targets = attach_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    assert len(targets) == 14 and "lm_head" not in targets
    assert all(layer.lora_A.weight.dtype == torch.float32 for layer in lora_layers(model).values())
    _randomize_lora(model)
    twin = peft.get_peft_model(
        _bnb_4bit(tiny_model("llama")),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"),
    )
    peft.set_peft_model_state_dict(twin, adapter_state_dict(model))
    with torch.no_grad():
        ours, theirs = model(_tokens()).logits, twin.eval()(_tokens()).logits
    assert torch.equal(ours, theirs) and not torch.allclose(ours, base)
    tokens = _tokens()
    model.train()
    model(tokens, labels=tokens).loss.backward()
    assert all(layer.lora_B.weight.grad is not None for layer in lora_layers(model).values())


def test_qlora_model_matches_peft_on_the_dequantized_base():
    """cura's own QLoRA stack (quantize_model + attach_lora) against PEFT on the same weights, dequantized."""
    model = tiny_model("mistral")
    quantize_model(model)
    targets = attach_lora(model, LoraConfig(r=4, alpha=8.0, dropout=0.0))
    assert all(isinstance(m.base_layer, Linear4bit) for m in lora_layers(model).values())
    assert len(targets) == 14
    _randomize_lora(model)
    twin_base = tiny_model("mistral")
    quantize_model(twin_base)
    dequantize_model(twin_base)
    twin = peft.get_peft_model(twin_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    peft.set_peft_model_state_dict(twin, adapter_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(
            model(_tokens()).logits, twin.eval()(_tokens()).logits, rtol=1e-5, atol=1e-5
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    tokens = _tokens()
    model.train()(tokens, labels=tokens).loss.backward()
    assert all(torch.count_nonzero(m.lora_A.weight.grad) > 0 for m in lora_layers(model).values())
