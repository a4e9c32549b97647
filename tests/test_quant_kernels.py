"""The CPU kernels (cura/quant/kernels.c) against the PyTorch reference: identical bits, or a clean fallback.

Each comparison runs the same public entry points twice, ``quantize_with(lib, ...)`` /
``dequantize_with(lib, ...)`` with the compiled library and with ``None`` (the reference), and compares
raw bits (so -0.0 vs 0.0 and NaN payloads count). Two builds are tested: the one `kernels.library()`
picks for this CPU (AVX-512 here) and a portable scalar build of the same file.
"""

import dataclasses
import logging
import mmap
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from cura.quant import BLOCKSIZES, code_4bit, dynamic_map_signed, kernels, quantize
from cura.quant.blockwise import quantize_blocks
from cura.quant.tensor import dequantize_with, quantize_with

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="no C compiler on this machine: the kernels cannot be built (the reference path is tested "
    "by test_quant.py)",
)


@pytest.fixture(scope="module")
def scalar_lib(tmp_path_factory):
    """The portable (no SIMD) variant of kernels.c, built into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CURA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return kernels.load(kernels.build(("-fopenmp", "-DCURA_SCALAR_ONLY")))


@pytest.fixture(params=["native", "scalar"])
def lib(request, scalar_lib):
    if request.param == "scalar":
        assert scalar_lib.cura_simd() == 0
        return scalar_lib
    native = kernels.library()
    assert native is not None, "a C compiler exists but the kernels did not build (see the debug log)"
    return native


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = _BITS[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))


def assert_same_quantization(lib, w, quant_type, blocksize, double_quant):
    fast = quantize_with(lib, w, quant_type, blocksize, double_quant)
    ref = quantize_with(None, w, quant_type, blocksize, double_quant)
    where = (tuple(w.shape), w.dtype, quant_type, blocksize, double_quant)
    assert same_bits(fast.packed, ref.packed), where
    assert same_bits(fast.absmax, ref.absmax), where
    if double_quant:
        assert same_bits(fast.nested_absmax, ref.nested_absmax) and fast.offset == ref.offset, where
    return ref


def assert_same_values(lib, q, dtypes=OUTPUT_DTYPES):
    for dtype in dtypes:
        assert same_bits(dequantize_with(lib, q, dtype), dequantize_with(None, q, dtype)), (q.shape, dtype)


def _sizes(blocksize: int) -> tuple[int, ...]:
    """Odd and tiny sizes, one short of / past a block, a short last block, and one large enough to be
    split over threads."""
    return (1, 2, 3, 31, 33, blocksize - 1, blocksize + 1, 3 * blocksize + 17, 2 * 65536 + 4 * blocksize + 5)


def _weights(n: int, blocksize: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, generator=gen) * torch.rand(n // blocksize + 1, generator=gen).repeat_interleave(
        blocksize
    )[:n].mul(4)
    if n > 3 * blocksize:
        w[blocksize : 2 * blocksize] = 0  # an all-zero block in the middle
    return w.to(dtype)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_every_blocksize_and_size_matches_the_reference(lib, dtype, quant_type, double_quant):
    gen = torch.Generator().manual_seed(INPUT_DTYPES.index(dtype) * 10 + double_quant)
    for blocksize in BLOCKSIZES:
        for n in _sizes(blocksize):
            q = assert_same_quantization(
                lib, _weights(n, blocksize, dtype, gen), quant_type, blocksize, double_quant
            )
            assert_same_values(lib, q, (torch.float32, dtype))
    assert_same_values(lib, q)  # the last (large) one in every output dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_ties_at_code_midpoints(lib, quant_type):
    """x / absmax landing exactly on a midpoint (absmax a power of two) and one float step either side."""
    values = code_4bit(quant_type).sort().values
    mids = (values[:-1] + values[1:]) / 2
    steps = torch.cat([mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0)), values])
    for blocksize in (64, 256):
        for scale in (1.0, 2.0**-7, 2.0**9):
            for n in (3 * blocksize, 3 * blocksize - 6):  # full blocks, and a short last block
                w = steps.repeat(-(-n // steps.numel()))[:n].clone()
                w[::blocksize] = 1.0  # every block's absmax is exactly 1 (times scale)
                w[-1] = -1.0
                for double_quant in (False, True):
                    q = assert_same_quantization(lib, w * scale, quant_type, blocksize, double_quant)
                    assert_same_values(lib, q)


def test_exact_ties_of_the_8bit_map(lib):
    """Double quantization's 8-bit step on its own: every midpoint of the dynamic map, exactly and one float
    step either side, in blocks whose absmax is 1 (and one all-zero block)."""
    values = dynamic_map_signed()
    mids = (values[:-1] + values[1:]) / 2
    x = torch.cat([mids, mids.nextafter(torch.tensor(2.0)), mids.nextafter(torch.tensor(-2.0)), values])
    x = torch.cat([x, torch.zeros(256), x.flip(0)[:100]])
    x[::256] = 1.0
    x[256 * 4 : 256 * 5] = 0.0
    codes, absmax = kernels.quantize_8bit(x, values, 256, lib)
    ref_codes, ref_absmax = quantize_blocks(x, values, 256, divide=True)
    assert same_bits(codes, ref_codes) and same_bits(absmax, ref_absmax)


def test_zero_tiny_huge_and_equal_scale_blocks(lib):
    """All-zero blocks (full and short last), denormal blocks (the 1e-38 clamp), values near float32 max,
    and blocks that all share one absmax (then absmax - offset is 0 and every 8-bit code is 0)."""
    gen = torch.Generator().manual_seed(3)
    cases = {
        "zeros": torch.zeros(64 * 5 + 7),
        "zero_tail": torch.cat([torch.randn(128, generator=gen), torch.zeros(30)]),
        "denormal": torch.randn(64 * 4 + 9, generator=gen) * 1e-40,
        "huge": torch.randn(64 * 4, generator=gen).clamp(-3, 3) * 1e38,
        "equal_absmax": torch.rand(64 * 300, generator=gen).index_fill_(
            0, torch.arange(0, 64 * 300, 64), 1.0
        ),
        "negative_zero": -torch.zeros(65),
    }
    for name, w in cases.items():
        for dtype in INPUT_DTYPES:
            if dtype != torch.float32 and name in ("denormal", "huge"):
                continue  # not representable (or flushed) in 16 bits
            for quant_type in ("nf4", "fp4"):
                for double_quant in (False, True):
                    q = assert_same_quantization(lib, w.to(dtype), quant_type, 64, double_quant)
                    assert_same_values(lib, q)


def test_non_finite_inputs_fall_back_to_the_reference(lib):
    """NaN / inf are left to the reference (the kernels report them and decline): same bits either way."""
    w = torch.randn(64 * 6 + 3)
    w[5], w[70], w[200] = float("nan"), float("inf"), float("-inf")
    assert kernels.quantize_4bit(w, code_4bit("nf4"), 64, lib) is None
    for double_quant in (False, True):
        fast = quantize_with(lib, w, "nf4", 64, double_quant)
        ref = quantize_with(None, w, "nf4", 64, double_quant)
        assert same_bits(fast.packed, ref.packed) and same_bits(fast.absmax, ref.absmax)
        assert_same_values(lib, ref)


def test_non_contiguous_and_offset_storage(lib):
    gen = torch.Generator().manual_seed(5)
    big = torch.randn(70, 130, generator=gen)
    for w in (big.t(), big[1:, 3:], big[::2], big.to(torch.bfloat16)[2:, 1:-1].t()):
        assert not w.is_contiguous()
        q = assert_same_quantization(lib, w, "nf4", 64, True)
        assert_same_values(lib, q)
    # Stored tensors that are views at odd offsets / strided, as a state dict may hand them over.
    q = quantize_with(None, big, "fp4", 64, True)
    shifted = torch.cat([torch.zeros(1, 1, dtype=torch.uint8), q.packed])[1:]
    strided = torch.stack([q.absmax, q.absmax], dim=1)[:, 0]
    as_int8 = q.packed.view(torch.int8)
    for view in (
        dataclasses.replace(q, packed=shifted),
        dataclasses.replace(q, absmax=strided),
        dataclasses.replace(q, packed=as_int8),
    ):
        assert_same_values(lib, view)
    plain = quantize_with(None, big, "nf4", 128, False)
    assert_same_values(lib, dataclasses.replace(plain, absmax=torch.stack([plain.absmax] * 2, 1)[:, 1]))


def test_output_buffer_is_filled_in_place(lib):
    q = quantize_with(None, torch.randn(300, 77), "nf4", 64, True)
    buffer = torch.full((300, 77), float("nan"))
    result = dequantize_with(lib, q, out=buffer)
    assert result.data_ptr() == buffer.data_ptr() and same_bits(buffer, dequantize_with(None, q))
    for dtype in (torch.bfloat16, torch.float16):  # a 16-bit buffer gets the values rounded once, in place
        half = torch.full((300 * 77,), float("nan"), dtype=dtype)
        result = dequantize_with(lib, q, dtype, out=half)
        assert result.data_ptr() == half.data_ptr() and same_bits(result, dequantize_with(None, q, dtype))
        reference = dequantize_with(None, q, dtype, out=torch.empty_like(half))  # the PyTorch path's copy
        assert same_bits(reference, dequantize_with(None, q, dtype))
    with pytest.raises(ValueError, match="out must be a contiguous float32, bfloat16 or float16"):
        dequantize_with(lib, q, out=torch.empty(300 * 77, dtype=torch.float64))


def test_large_outputs_on_huge_pages(lib, monkeypatch):
    """Outputs of LARGE_OUTPUT_BYTES and more get their own 2 MiB-aligned mapping: same bits."""
    monkeypatch.setattr(kernels, "LARGE_OUTPUT_BYTES", 1 << 20)
    q = quantize_with(None, torch.randn(1024, 700), "nf4", 64, True)
    for dtype in (torch.float32, torch.bfloat16):
        values = dequantize_with(lib, q, dtype)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            assert values.data_ptr() % kernels.HUGE_PAGE == 0
        assert same_bits(values, dequantize_with(None, q, dtype))


def test_uneven_thread_splits(lib, monkeypatch):
    """More threads than cores and a split that is not a multiple of anything: blocks stay whole."""
    monkeypatch.setattr(kernels, "MIN_ELEMENTS_PER_THREAD", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for n in (5, 64 * 7 + 1, 64 * 1000 + 33):
            q = assert_same_quantization(lib, torch.randn(n), "nf4", 64, True)
            assert_same_values(lib, q)
    finally:
        torch.set_num_threads(previous)


def test_public_functions_use_the_kernels_and_match_bitsandbytes_layout():
    w = torch.randn(256, 96, dtype=torch.bfloat16)
    assert kernels.library() is not None
    q = quantize(w)
    ref = quantize_with(None, w, "nf4", 64, True)
    assert same_bits(q.packed, ref.packed) and same_bits(q.absmax, ref.absmax)
    assert same_bits(q.dequantize(), dequantize_with(None, ref)) and q.dequantize().dtype == torch.bfloat16


def test_kernels_disabled_by_environment_use_the_reference(monkeypatch):
    w = torch.randn(130, 70)
    ref = quantize_with(None, w, "nf4", 64, True)
    libs_seen = []
    for name in ("quantize_4bit", "quantize_8bit", "dequantize_4bit"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, k=kernel: libs_seen.append(args[-1]) or k(*args))
    monkeypatch.setenv("CURA_KERNELS", "0")
    assert kernels.library() is None
    q = quantize(w)
    values = q.dequantize()
    assert libs_seen and all(lib is None for lib in libs_seen)  # the kernels were offered no library
    assert same_bits(q.packed, ref.packed) and same_bits(q.absmax, ref.absmax)
    assert same_bits(values, dequantize_with(None, ref))


def test_a_failed_build_falls_back_silently(monkeypatch, tmp_path, caplog):
    """No compiler: one debug line, no exception, and quantize / dequantize still give the reference bits."""
    monkeypatch.setenv("CURA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels, "_loaded", [])
    with caplog.at_level(logging.DEBUG, logger="cura.quant.kernels"):
        assert kernels.library() is None
        w = torch.randn(100, 33)
        q = quantize(w)
    assert len(caplog.records) == 1 and "using the PyTorch reference" in caplog.records[0].getMessage()
    ref = quantize_with(None, w, "nf4", 64, True)
    assert same_bits(q.packed, ref.packed) and same_bits(q.dequantize(), dequantize_with(None, ref))
    assert not list(tmp_path.glob("kernels/*.so"))


def test_concurrent_builds_leave_one_whole_library(tmp_path, monkeypatch):
    """Racing builders (threads here, processes alike) each compile to a temporary name and rename."""
    monkeypatch.setenv("CURA_CACHE", str(tmp_path))
    flags = ("-DCURA_SCALAR_ONLY",)
    paths: list = []
    builders = [threading.Thread(target=lambda: paths.append(kernels.build(flags))) for _ in range(2)]
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    assert len(paths) == 2 and paths[0] == paths[1]
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir()) == [paths[0].name]
    assert kernels.self_check(kernels.load(paths[0])) is None


def test_importing_cura_builds_nothing(tmp_path):
    code = (
        "import cura, cura.quant, cura.nn; from cura.quant import kernels; import pathlib, sys; "
        "sys.exit(bool(kernels._loaded) or pathlib.Path(sys.argv[1]).joinpath('kernels').exists())"
    )
    env = dict(os.environ, CURA_CACHE=str(tmp_path))
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env).returncode == 0
