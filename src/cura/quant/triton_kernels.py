"""GPU fast path of the 4-bit format: Triton kernels for CUDA tensors (tested on CPU with TRITON_INTERPRET=1).

Two kernels, both reading the packed bytes and block scales exactly as `cura.quant.blockwise` lays them out:

- `dequantize_4bit`: packed NF4/FP4 codes -> float32 / bfloat16 / float16 in ONE launch per weight. With
  double quantization the nested absmax is decoded inline (``nested_code[absmax8[b]] * nested_absmax[b //
  256] + offset``), so no float32 absmax is materialised first. Each program decodes `_BYTES` bytes
  (``2 * _BYTES`` values): a coalesced read of the bytes, two 16-entry code-book gathers (in L1), one scale
  per pair (a blocksize is even, so both nibbles of a byte share a block), an interleaved store.
- `matmul_4bit`: ``x @ dequant(W)^T`` for a few rows of x (generation, short batches): each program owns
  `BLOCK_N` output features, decodes its [BLOCK_N, BLOCK_K] tile of W in registers and accumulates
  ``x_tile @ w_tile^T`` in float32 (`tl.dot`), so W is never written out in 16 bits.

Bits: the arithmetic is the reference's, in its order (``scale = code8 * nested + offset``, then ``value =
code4 * scale``, in float32, then one round-to-nearest-even cast); the kernels are compiled without
floating-point contraction (``enable_fp_fusion=False``: no fused multiply-add), so dequantization equals
the PyTorch reference bit for bit. The matmul differs from ``x @ dequant(W)^T`` only in summation order.

Triton is optional: it is imported (through `cura.optional.require`) on the first call, never at import,
and the kernels are jitted then. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same
kernels run on CPU tensors, which is how the tests check them on machines without a GPU; cura itself only
calls them for CUDA tensors (see `cura.quant.tensor.dequant_backend`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from cura.optional import available, require

triton: Any = None  # set by `_kernels()`; the kernel bodies resolve `tl` from this module's globals
tl: Any = None
round_bf16: Any = None  # the jitted `_round_bf16`, set by `_kernels()`

_BYTES = 1024
"""Packed bytes per dequantization program (2048 values): 1 KiB in, 4-8 KiB out per program, enough
programs for every SM on a 1B model's smallest weight (576 x 576 -> 162 programs)."""

FUSED_MAX_ROWS = 16
"""Rows of x up to which `linear_4bit` on CUDA uses the fused `matmul_4bit` (one `tl.dot` tile of 16 rows):
above it, one dequantization plus cuBLAS reads W once for many rows and wins."""

_MATMUL_TILE = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64)
"""16 rows (the smallest `tl.dot` tile), 32 output features per program (128 programs for N = 4096 on
132 SMs), 64 inputs per step (one absmax block at the default blocksize)."""

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@cache
def triton_available() -> bool:
    """Whether triton can be imported here (without importing it)."""
    return available("triton")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` when it was imported)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _round_bf16(x):
    """float32 -> bfloat16, round to nearest even, in integer arithmetic (torch's rule for finite values).

    Written out because Triton's interpreter truncates in ``.to(tl.bfloat16)``; on a GPU this is a few
    integer ops on data that is memory-bound anyway, and the same bits as the native RTNE conversion."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    out_ptr,
    offset,
    n,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BYTES + tl.arange(0, BYTES)  # (BYTES,)
    mask = byte < n_bytes
    b = tl.load(packed_ptr + byte, mask=mask, other=0).to(tl.int32)
    high = tl.load(code_ptr + (b >> 4), mask=mask, other=0.0)  # the even element
    low = tl.load(code_ptr + (b & 15), mask=mask, other=0.0)  # the odd element
    block = (2 * byte) // BLOCKSIZE
    if DOUBLE_QUANT:
        a8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + a8, mask=mask, other=0.0) * nested + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    values = tl.interleave(high * scale, low * scale)  # (2 * BYTES,) float32
    if out_ptr.dtype.element_ty == tl.bfloat16:
        values = round_bf16(values)
    else:
        values = values.to(out_ptr.dtype.element_ty)
    index = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + index, values, mask=index < n)


def _matmul_4bit_kernel(
    x_ptr,
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    out_ptr,
    offset,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: rows of W
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of x
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)
        idx = rn[:, None].to(tl.int64) * K + rk[None, :]  # (BLOCK_N, BLOCK_K) flat element index in W
        b = tl.load(packed_ptr + idx // 2, mask=w_mask, other=0).to(tl.int32)
        nibble = (b >> ((1 - idx % 2) * 4).to(tl.int32)) & 15  # even element: high nibble
        block = idx // BLOCKSIZE
        if DOUBLE_QUANT:
            a8 = tl.load(absmax_ptr + block, mask=w_mask, other=0).to(tl.int32)
            nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=w_mask, other=0.0)
            scale = tl.load(nested_code_ptr + a8, mask=w_mask, other=0.0) * nested + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=w_mask, other=0.0)
        w = tl.load(code_ptr + nibble, mask=w_mask, other=0.0) * scale
        if out_ptr.dtype.element_ty == tl.bfloat16:
            w = round_bf16(w)  # the reference's dequantized bf16 weight, exactly
        else:
            w = w.to(out_ptr.dtype.element_ty)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
        x = x.to(out_ptr.dtype.element_ty)
        # Note: the dot takes float32 operands holding the 16-bit values: TF32 keeps 11 significant bits,
        # so every product of two bf16/fp16 values is exact, as in a 16-bit dot with float32 accumulation
        # (and Triton's interpreter multiplies raw bits in a bf16 dot, so this is also what can be tested).
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="tf32")
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        result = round_bf16(acc)
    else:
        result = acc.to(out_ptr.dtype.element_ty)
    tl.store(out, result, mask=out_mask)


@cache
def _kernels() -> tuple[Any, Any]:
    """Import triton (one sentence if it is missing) and jit both kernels, once per process."""
    global triton, tl, round_bf16
    triton = require("triton", extra="gpu", purpose="the 4-bit GPU kernels")
    tl = require("triton.language", extra="gpu", purpose="the 4-bit GPU kernels", distribution="triton")
    round_bf16 = triton.jit(_round_bf16)
    return triton.jit(_dequantize_4bit_kernel), triton.jit(_matmul_4bit_kernel)


def _launch_options() -> dict:
    """No fused multiply-add on the GPU (the reference rounds each product); the interpreter takes none."""
    return {} if interpreting() else {"enable_fp_fusion": False}


def _nested(q) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """The DQ tensors of `q` (or stand-ins the kernel never reads without DQ)."""
    if q.double_quant:
        return q.nested_absmax, q.nested_code, float(q.offset), q.nested_blocksize
    return q.absmax, q.code, 0.0, q.nested_blocksize


def dequantize_4bit(q, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """`q` (a `QuantizedTensor`) dequantized to `dtype` (float32, bfloat16, float16) in one kernel launch.

    Returns a flat ``[numel]`` tensor on q's device (written into `out` when given: contiguous, numel
    elements, float32 or `dtype`).
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"the Triton dequantization writes {_OUT_DTYPES}, not {dtype}; cast afterwards.")
    dequant, _ = _kernels()
    n = q.numel
    if out is None:
        out = torch.empty(n, dtype=dtype, device=q.packed.device)
    elif out.numel() != n or not out.is_contiguous() or out.dtype not in _OUT_DTYPES:
        raise ValueError(f"out must be a contiguous float tensor of {n} elements, got {tuple(out.shape)}.")
    nested_absmax, nested_code, offset, nested_blocksize = _nested(q)
    n_bytes = (n + 1) // 2
    grid = (triton.cdiv(n_bytes, _BYTES),)
    dequant[grid](
        q.packed.reshape(-1), q.absmax, q.code, nested_absmax, nested_code, out.view(-1), offset, n, n_bytes,
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=q.double_quant,
        BYTES=_BYTES, **_launch_options(),
    )  # fmt: skip
    return out.view(-1)


def matmul_4bit(x: torch.Tensor, q, dtype: torch.dtype) -> torch.Tensor:
    """``x @ dequant(q)^T`` in `dtype` for a 2-D weight `q` [N, K] and x [..., K]: returns [..., N].

    W's tile is decoded in registers and rounded to `dtype` (as the reference's dequantized weight is),
    products accumulate in float32 (exact IEEE products for float32, not TF32).
    """
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"the fused 4-bit matmul computes in {_OUT_DTYPES}, not {dtype}.")
    if len(q.shape) != 2 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"matmul_4bit needs x [..., {q.shape[-1]}] and a 2-D weight, got {tuple(x.shape)}.")
    _, matmul = _kernels()
    n_out, k = q.shape
    rows = x.reshape(-1, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m = rows.shape[0]
    out = torch.empty(m, n_out, dtype=dtype, device=x.device)
    nested_absmax, nested_code, offset, nested_blocksize = _nested(q)
    tile = _MATMUL_TILE
    grid = (triton.cdiv(n_out, tile["BLOCK_N"]), triton.cdiv(m, tile["BLOCK_M"]))
    matmul[grid](
        rows, q.packed.reshape(-1), q.absmax, q.code, nested_absmax, nested_code, out, offset,
        m, n_out, k, rows.stride(0), out.stride(0),
        BLOCKSIZE=q.blocksize, NESTED_BLOCKSIZE=nested_blocksize, DOUBLE_QUANT=q.double_quant,
        IEEE=dtype == torch.float32, **tile, **_launch_options(),
    )  # fmt: skip
    return out.view(*x.shape[:-1], n_out)
