"""Linear4bit and quantize_model: outputs, gradients, saved memory, state dicts (vs torch, bitsandbytes)."""

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from bnb_ref import float_path
from cura.nn import Linear4bit, dequantize_model, quantize_model
from cura.quant import dequantize
from tiny import ARCHS, tiny_model

pytestmark = pytest.mark.usefixtures("eager_bitsandbytes")


def _layer(out_features=48, in_features=80, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(in_features, out_features, bias=bias), **kwargs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_matches_linear_on_dequantized_weight(bias, quant_type):
    layer = _layer(bias=bias, quant_type=quant_type)
    x = torch.randn(3, 5, 80)
    q = layer.quantized_weight
    expected = F.linear(x, dequantize(q), layer.bias)
    assert layer.in_features == 80 and layer.out_features == 48 and layer.quant_type == quant_type
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_compute_dtype_bfloat16():
    layer = _layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 80)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = F.linear(
        x.bfloat16(), dequantize(layer.quantized_weight, torch.bfloat16), layer.bias.bfloat16()
    )
    torch.testing.assert_close(y, expected.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding of matmul + bias
    assert not torch.equal(y, F.linear(x, dequantize(layer.quantized_weight), layer.bias))  # not fp32


def test_input_gradient_matches_float64_reference():
    layer = _layer(seed=3)
    x = torch.randn(6, 80, requires_grad=True)
    grad_out = torch.randn(6, 48)
    layer(x).backward(grad_out)
    w64 = dequantize(layer.quantized_weight, torch.float64)
    torch.testing.assert_close(x.grad.double(), grad_out.double() @ w64, rtol=1e-5, atol=1e-5)
    assert layer.bias.grad is not None  # the bias (full precision) still trains if left unfrozen
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0))


def test_only_the_4bit_weight_is_saved_for_backward():
    layer = _layer(out_features=256, in_features=512)
    layer.bias.requires_grad_(False)
    x = torch.randn(8, 512, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    q = layer.quantized_weight
    four_bit = {q.packed.data_ptr(), q.absmax.data_ptr(), q.nested_absmax.data_ptr()}
    assert {t.data_ptr() for t in saved} <= four_bit, [tuple(t.shape) for t in saved]
    saved_bytes = sum(t.nbytes for t in saved)
    assert saved_bytes <= q.nbytes < 512 * 256 * 4 / 7  # ~4.13 bits per weight, never a float copy
    y.sum().backward()
    assert x.grad is not None


def test_buffers_not_parameters_and_follow_device_not_dtype():
    layer = _layer()
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert {name for name, _ in layer.named_buffers()} >= {"weight", "absmax", "code"}
    before = layer.quantized_weight.dequantize()
    layer.to(torch.bfloat16)  # casts the bias only: the 4-bit codes and scales are never altered
    assert layer.bias.dtype == torch.bfloat16 and layer.code.dtype == torch.float32
    assert torch.equal(layer.quantized_weight.dequantize(), before)
    if torch.cuda.is_available():
        layer.to("cuda")
        assert layer.weight.device.type == "cuda" and layer.quantized_weight.device.type == "cuda"
        assert torch.equal(layer.quantized_weight.dequantize().cpu(), before)


IN_ALIGNED = 128
"""Rows a whole number of blocks long, as in real models: bitsandbytes' AVX-512 CPU kernel mis-decodes others
(see bnb_ref); cura's own odd shapes are checked against its PyTorch backend in test_quant."""


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_state_dict_has_bitsandbytes_keys_and_loads_both_ways(double_quant):
    torch.manual_seed(1)
    linear = nn.Linear(IN_ALIGNED, 48)
    ours = Linear4bit.from_linear(linear, double_quant=double_quant)
    theirs = bnb.nn.Linear4bit(
        IN_ALIGNED, 48, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4"
    )
    theirs.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
    )
    theirs.bias = nn.Parameter(linear.bias.data.clone())
    theirs = float_path(theirs.to("cpu"))  # bitsandbytes quantizes on .to()
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for key in sd_ours:
        assert sd_ours[key].dtype == sd_theirs[key].dtype and sd_ours[key].shape == sd_theirs[key].shape, key
    assert torch.equal(sd_ours["weight"], sd_theirs["weight"])

    # bitsandbytes -> cura: a fresh layer with other weights takes bnb's state dict and agrees with it.
    fresh = _layer(in_features=IN_ALIGNED, seed=9, double_quant=not double_quant)
    fresh.load_state_dict(sd_theirs)
    x = torch.randn(4, IN_ALIGNED)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), theirs(x), rtol=1e-6, atol=1e-6)
        # cura -> bitsandbytes: Params4bit.from_prequantized reads our entries.
        weight = bnb.nn.Params4bit.from_prequantized(
            data=sd_ours["weight"],
            quantized_stats={k[len("weight.") :]: v for k, v in sd_ours.items() if k.startswith("weight.")},
            requires_grad=False,
            device="cpu",
        )
        loaded = float_path(bnb.nn.Linear4bit(IN_ALIGNED, 48, compute_dtype=torch.float32))
        loaded.weight, loaded.bias = weight, nn.Parameter(sd_ours["bias"])
        torch.testing.assert_close(loaded(x), ours(x), rtol=1e-6, atol=1e-6)


def test_load_state_dict_rejects_wrong_shape():
    big = _layer(out_features=64).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        _layer().load_state_dict(big)


def test_quantize_model_matches_dequantized_reference(arch, make_tiny):
    model = make_tiny(arch)
    reference = copy.deepcopy(model)
    names = quantize_model(model)
    linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    assert names == [n for n in linears if not n.endswith("lm_head")] and names
    assert all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    assert not any(p.dtype == torch.uint8 for p in model.parameters())
    for name in names:  # the reference holds exactly the dequantized weights
        reference.get_submodule(name).weight.data = model.get_submodule(name).quantized_weight.dequantize()
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        quantized_logits = model(ids).logits
        dequantize_model(model)
        assert not any(isinstance(m, Linear4bit) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, quantized_logits, rtol=1e-5, atol=1e-5)


def test_quantize_model_include_and_skip(make_tiny):
    model = make_tiny("llama")
    assert quantize_model(model, include=("q_proj", "v_proj"), blocksize=32) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    model = make_tiny("llama")
    names = quantize_model(model, skip=("lm_head", "mlp.down_proj"))
    assert not any(n.endswith("down_proj") or n.endswith("lm_head") for n in names) and len(names) == 12


def test_cura_checkpoint_loads_in_transformers_with_bitsandbytes(make_tiny, tmp_path):
    """A cura-quantized tiny model's state dict is a valid transformers + bitsandbytes checkpoint."""
    from safetensors.torch import save_file

    model = make_tiny("qwen2")  # tied embeddings and q/k/v biases
    quantize_model(model, blocksize=64)
    config = model.config
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ).to_dict()
    config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = float_path(AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval())
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_on_a_4bit_base_dequantizes_once_per_forward_and_once_per_backward(monkeypatch):
    """base + LoRA: LoRA's matmuls never need W, so the composition already dequantizes W once in forward
    and once in backward (with activation checkpointing the recomputed forward adds one more)."""
    from cura.nn import LoRALinear
    from cura.quant.tensor import QuantizedTensor

    calls = []
    real = QuantizedTensor.dequantize

    def counting(self, *args, **kwargs):
        calls.append(self.shape)
        return real(self, *args, **kwargs)

    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(64, 32)), r=4, alpha=8, dropout=0.1)
    torch.nn.init.normal_(layer.lora_B.weight)
    plain = torch.nn.Linear(64, 32)
    with torch.no_grad():
        plain.weight.copy_(layer.base_layer.quantized_weight.dequantize(torch.float32))
        plain.bias.copy_(layer.base_layer.bias)
    monkeypatch.setattr(QuantizedTensor, "dequantize", counting)
    x = torch.randn(5, 64, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    assert len(calls) == 1
    y.square().sum().backward()
    assert len(calls) == 2
    # parity with the same LoRA on a plain linear holding the dequantized weight (same dropout mask)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    mask_free = plain(x_ref) + layer.lora_B(layer.lora_A(layer.lora_dropout(x_ref))) * layer.scaling
    mask_free.square().sum().backward()
    torch.testing.assert_close(y, mask_free, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_keeps_its_dequantized_weight_for_backward(monkeypatch, reentrant):
    """Under activation checkpointing each weight is decoded twice per step, not three times: the recompute
    (a forward inside backward) keeps its copy for the backward right after it, which frees it. Gradients
    are bit-identical to the same layers without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from cura.nn import linear4bit
    from cura.quant.tensor import QuantizedTensor

    first, second = _layer(out_features=96, in_features=80, seed=1), _layer(out_features=48, in_features=96)

    def block(x):
        return second(torch.nn.functional.silu(first(x)))

    x = torch.randn(6, 80)
    grad_out = torch.randn(6, 48)
    x_plain = x.clone().requires_grad_()
    block(x_plain).backward(grad_out)
    bias_grads = [first.bias.grad.clone(), second.bias.grad.clone()]
    first.zero_grad(), second.zero_grad()

    calls = []
    real = QuantizedTensor.dequantize

    def counting(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QuantizedTensor, "dequantize", counting)
    x_ckpt = x.clone().requires_grad_()
    y = checkpoint(block, x_ckpt, use_reentrant=reentrant)
    assert len(calls) == 2  # the forward, no grad kept
    y.backward(grad_out)
    assert len(calls) == 4, calls  # + the recompute; backward reused its copies
    assert not linear4bit._recomputed  # each kept copy was freed by its backward
    assert torch.equal(x_ckpt.grad, x_plain.grad)
    assert torch.equal(first.bias.grad, bias_grads[0]) and torch.equal(second.bias.grad, bias_grads[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_recompute_skips_the_residual_output_matmul_with_identical_gradients(arch):
    """Under checkpointing a listed family's MLP output projection returns zeros in the recompute (its
    output only feeds the residual add, which saves nothing): gradients bit-identical to the unmarked model."""
    from cura.adapters import LoraConfig, attach_lora
    from cura.constants import RESIDUAL_MLP_OUTPUT_MODEL_TYPES
    from cura.nn.linear4bit import mark_residual_outputs, quantize_model
    from cura.train.steps import enable_activation_checkpointing

    def build():
        model = tiny_model(arch)
        quantize_model(model)
        torch.manual_seed(0)
        attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1))
        for name, param in model.named_parameters():  # B != 0: every LoRA path reaches the gradients
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
        enable_activation_checkpointing(model)
        return model.train()

    torch.manual_seed(3)
    ids = torch.randint(3, 300, (2, 12))

    def gradients(model):
        torch.manual_seed(5)  # the same dropout masks for both
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, marked = build(), build()
    names = mark_residual_outputs(marked)
    listed = marked.config.model_type in RESIDUAL_MLP_OUTPUT_MODEL_TYPES
    assert len(names) == (len(marked.model.layers) if listed else 0), names
    recomputed = []
    for name in names:
        marked.get_submodule(name).base_layer.register_forward_hook(
            lambda m, i, out: (
                recomputed.append(bool(out.count_nonzero() == 0))
                if torch._C._current_graph_task_id() != -1
                else None
            )
        )
    expected, got = gradients(plain), gradients(marked)
    assert recomputed == [True] * len(names)  # each marked layer's recompute skipped its matmul
    assert expected.keys() == got.keys()
    for n in expected:
        assert torch.equal(expected[n], got[n]), n


def test_no_copy_is_kept_outside_a_recompute():
    """A plain forward + backward (no checkpointing) and a forward whose input needs no gradient keep nothing."""
    from cura.nn import linear4bit

    layer = _layer()
    layer(torch.randn(3, 80, requires_grad=True)).sum().backward()
    with torch.no_grad():
        layer(torch.randn(3, 80))
    layer(torch.randn(3, 80)).sum().backward()  # only the bias needs a gradient
    assert not linear4bit._recomputed
