"""The Triton kernels of the 4-bit format, run on CPU tensors in Triton's interpreter, against the reference.

TRITON_INTERPRET is set here, at import, before triton is imported or any kernel is jitted (cura jits them
on first use, see `cura.quant.triton_kernels._kernels`), so these tests need no GPU. Dequantization must be
bit-identical to the PyTorch reference (`cura.quant.blockwise`); the fused matmul is held to a bf16 bound.
Where CUDA exists the interpreter is not switched on (it would also serve the compiled GPU tests of
tests/test_gpu_kernels.py in the same process), and these tests skip, saying so.
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: its jit then builds interpreted kernels

pytest.importorskip("triton", reason="triton is not installed: the GPU kernels cannot be checked here")

from cura.nn import linear4bit as linear4bit_module  # noqa: E402
from cura.nn.linear4bit import Linear4bit, linear_4bit, matmul_backend  # noqa: E402
from cura.quant import quantize, tensor, triton_kernels  # noqa: E402
from cura.quant.tensor import dequant_backend, dequantize_on_device, dequantize_with  # noqa: E402

triton_kernels._kernels.cache_clear()  # jit (again) under the interpreter, whatever ran before


@pytest.fixture(autouse=True)
def _interpreter():
    if not triton_kernels.interpreting():
        pytest.skip(
            "CUDA is present (tests/test_gpu_kernels.py checks the compiled kernels) or TRITON_INTERPRET was unset"
        )


def _weight(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 3).to(dtype)


CASES = [  # (quant_type, double_quant, blocksize, shape): odd numel, a short last block, > 256 blocks
    ("nf4", True, 64, (37, 61)),
    ("nf4", False, 64, (64, 48)),
    ("fp4", True, 128, (50, 72)),
    ("fp4", False, 32, (9, 31)),
    ("nf4", True, 32, (96, 100)),  # 300 absmax blocks: two nested blocks
]


@pytest.mark.parametrize("quant_type,double_quant,blocksize,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_matches_reference_bit_for_bit(quant_type, double_quant, blocksize, shape, dtype):
    q = quantize(_weight(shape, seed=hash((quant_type, blocksize, shape)) % 1000), quant_type, blocksize,
                 double_quant)  # fmt: skip
    ref = dequantize_with(None, q, dtype)  # the PyTorch reference (blockwise.dequantize_packed)
    got = dequantize_on_device("triton", q, dtype)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.equal(got, ref)


def test_dequantize_into_float32_out_and_float64():
    q = quantize(_weight((40, 70), seed=3))
    out = torch.full((40 * 70,), float("nan"))
    got = dequantize_on_device("triton", q, torch.bfloat16, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, dequantize_with(None, q, torch.float32))
    assert torch.equal(
        dequantize_on_device("triton", q, torch.float64), dequantize_with(None, q, torch.float64)
    )


def test_whole_tensor_torch_path_matches_reference():
    for double_quant in (True, False):
        q = quantize(_weight((33, 65), seed=4), double_quant=double_quant)
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_on_device("torch-whole", q, dtype), dequantize_with(None, q, dtype))


def _bf16_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Stated tolerance of a bf16 matmul with float32 accumulation: 2^-7 of sum |x_k| |w_k| per output
    (one bf16 rounding of the result is 2^-9 relative; accumulation order adds far less)."""
    return 2.0**-7 * (x.abs().double() @ w.abs().double().t()) + 1e-6


@pytest.mark.parametrize("rows", [1, 5, 19])  # one row (generation), a few, more than one 16-row tile
@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 32)])
def test_fused_matmul_within_bf16_tolerance(rows, quant_type, double_quant, blocksize):
    n_out, k = 40, 100  # K not a multiple of the blocksize: blocks straddle rows of W
    q = quantize(_weight((n_out, k), seed=rows), quant_type, blocksize, double_quant)
    x = _weight((rows, k), seed=100 + rows, dtype=torch.bfloat16)
    w = dequantize_with(None, q, torch.bfloat16)
    got = triton_kernels.matmul_4bit(x, q, torch.bfloat16)
    exact = x.double() @ w.double().t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n_out)
    assert ((got.double() - exact).abs() <= _bf16_bound(x, w)).all()
    assert ((x @ w.t()).double() - exact).abs().max() <= _bf16_bound(x, w).max()  # the bound is fair


def test_fused_matmul_float32_is_ieee_and_keeps_leading_dims():
    q = quantize(_weight((24, 64), seed=7))
    x = _weight((2, 3, 64), seed=8)
    got = triton_kernels.matmul_4bit(x, q, torch.float32)
    ref = x @ dequantize_with(None, q, torch.float32).t()
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # float32 products, not TF32


def test_dispatch_is_explicit_and_cuda_never_takes_the_cpu_chunk_loop(monkeypatch):
    assert dequant_backend(torch.device("cpu")) == "c"
    assert dequant_backend(torch.device("cuda")) == "triton"
    monkeypatch.setattr(triton_kernels, "triton_available", lambda: False)
    assert dequant_backend(torch.device("cuda")) == "torch-whole"
    monkeypatch.setenv("CURA_KERNELS", "0")
    assert dequant_backend(torch.device("cpu")) == "torch"
    assert dequant_backend(torch.device("cuda")) == "torch-whole"  # never "torch": the CPU chunk loop


def test_quantized_tensor_dequantize_routes_to_triton_without_the_chunk_loop(monkeypatch):
    q = quantize(_weight((30, 64), seed=9))
    ref = dequantize_with(None, q, torch.bfloat16)

    def chunk_loop(*args, **kwargs):
        raise AssertionError("the CPU chunk loop ran on the accelerator path")

    monkeypatch.setattr(tensor, "dequant_backend", lambda device: "triton")
    monkeypatch.setattr(tensor, "dequantize_packed", chunk_loop)
    assert torch.equal(q.dequantize(torch.bfloat16), ref)


def test_matmul_dispatch():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert matmul_backend(cuda, 1, torch.bfloat16) == "fused"
    assert matmul_backend(cuda, triton_kernels.FUSED_MAX_ROWS, torch.float16) == "fused"
    assert matmul_backend(cuda, triton_kernels.FUSED_MAX_ROWS + 1, torch.bfloat16) == "dequantize"
    assert matmul_backend(cpu, 1, torch.bfloat16) == "dequantize"
    assert matmul_backend(cuda, 1, torch.float64) == "dequantize"


def test_linear4bit_forward_and_backward_through_the_fused_kernel(monkeypatch):
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48, bias=True), compute_dtype=torch.bfloat16)
    x = _weight((3, 64), seed=11, dtype=torch.bfloat16).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = linear_4bit(x_ref, layer.quantized_weight, layer.bias, torch.bfloat16)
    monkeypatch.setattr(linear4bit_module, "matmul_backend", lambda device, rows, dtype: "fused")
    got = layer(x)
    w = dequantize_with(None, layer.quantized_weight, torch.bfloat16)
    bound = _bf16_bound(x.detach(), w) + 2.0**-8 * layer.bias.detach().abs().double()
    assert ((got.double() - ref.double()).abs() <= 2 * bound).all()
    got.sum().backward()
    ref.sum().backward()
    assert torch.equal(x.grad, x_ref.grad)  # backward: the same dequantize + matmul on both


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "train_gpu.py"
    spec = importlib.util.spec_from_file_location("train_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_dry_run_core(tmp_path):
    """The parts of bench/train_gpu.py a CPU can run (what `bench/gpu.sh --dry-run` runs, minus its
    subprocesses): the kernel measurements in the interpreter, one cura QLoRA training arm on a tiny
    random Llama, the planner's prediction for the 8B shape, MFU."""
    bench = _bench_module()
    kernels = bench.kernel_bench(dry=True)
    assert kernels["interpreter"] and all(s["bit_exact"] for s in kernels["shapes"].values())
    bench.write_model("tiny", tmp_path / "tiny", dry=True)
    result = bench.child("cura_qlora", tmp_path / "tiny", [1], 16, 1, 0, dry=True)
    step = result["batches"]["1"]
    assert step["tokens_per_second"] > 0 and math.isfinite(step["losses"][0])
    n_linear, layers, hidden = bench.linear_params("llama-3-8b")
    predicted = bench.predicted_allocated("llama-3-8b", "cura_qlora", 4, 2048, dry=False)
    assert n_linear * 0.5 < predicted < n_linear * 2  # 4-bit weights, at most bf16-sized extras
    assert (
        bench.mfu("llama-3-8b", 1000.0, 2048, 1e15)
        == 1000.0 * (4 * n_linear + 6 * layers * 2048 * hidden) / 1e15
    )
