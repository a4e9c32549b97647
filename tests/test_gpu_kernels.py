"""The compiled Triton kernels on a CUDA device against the CPU reference (skipped, saying so, without CUDA).

The same checks as tests/test_triton_kernels.py (which runs them in Triton's interpreter on CPU), here on
the real GPU code: dequantization bit for bit, the fused matmul within the bf16 bound, the dispatch of a
CUDA tensor (never the CPU chunk loop), and Linear4bit's forward/backward against the CPU layer.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("triton", reason="triton is not installed: no GPU kernels to check")

from cura.nn.linear4bit import Linear4bit  # noqa: E402
from cura.quant import quantize, tensor, triton_kernels  # noqa: E402
from cura.quant.tensor import dequant_backend, dequantize_with  # noqa: E402

CASES = [("nf4", True, 64, (4096, 1000)), ("nf4", False, 64, (37, 61)), ("fp4", True, 128, (333, 257)),
         ("nf4", True, 32, (96, 100))]  # fmt: skip


@pytest.fixture(autouse=True)
def _compiled():
    if triton_kernels.interpreting():
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")


def _weight(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen) * 3


@pytest.mark.parametrize("quant_type,double_quant,blocksize,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_dequantize_bit_for_bit(quant_type, double_quant, blocksize, shape, dtype):
    q_cpu = quantize(_weight(shape, 0), quant_type, blocksize, double_quant)
    q = q_cpu.to("cuda")
    assert dequant_backend(q.device) == "triton"
    assert torch.equal(q.dequantize(dtype).cpu(), dequantize_with(None, q_cpu, dtype))


def test_cuda_dequantize_never_runs_the_chunk_loop(monkeypatch):
    def chunk_loop(*args, **kwargs):
        raise AssertionError("the CPU chunk loop ran on CUDA")

    monkeypatch.setattr(tensor, "dequantize_packed", chunk_loop)
    q = quantize(_weight((64, 64), 1)).to("cuda")
    q.dequantize(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_cuda_fused_matmul_within_bf16_tolerance(rows):
    q_cpu = quantize(_weight((512, 1000), rows))
    x = _weight((rows, 1000), 100 + rows).to(torch.bfloat16)
    w = dequantize_with(None, q_cpu, torch.bfloat16)
    got = triton_kernels.matmul_4bit(x.cuda(), q_cpu.to("cuda"), torch.bfloat16).cpu()
    exact = x.double() @ w.double().t()
    bound = 2.0**-7 * (x.abs().double() @ w.abs().double().t()) + 1e-6
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows", [3, 64])  # fused forward, then dequantize + cuBLAS
def test_cuda_linear4bit_matches_cpu(rows):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(256, 128), compute_dtype=torch.bfloat16)
    x = torch.randn(rows, 256, dtype=torch.bfloat16, requires_grad=True)
    x_gpu = x.detach().cuda().requires_grad_()
    y, y_gpu = layer(x), layer.cuda()(x_gpu)
    torch.testing.assert_close(y_gpu.cpu(), y, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    y_gpu.float().square().sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x.grad, rtol=3e-2, atol=3e-2)
