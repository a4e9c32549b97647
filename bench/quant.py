"""Benchmark the 4-bit format: storage bits per parameter and CPU throughput of cura vs bitsandbytes.

    flock /tmp/cura-bench.lock python bench/quant.py [--size 4096] [--repeats 7]

Everything runs on the same 4096 x 4096 float32 tensor in the same process, interleaved round-robin, and
the medians are compared as ratios (the machine may be shared, so absolute numbers are noisy):

- ``cura``: the public functions, i.e. the compiled CPU kernels (`cura.quant.kernels`);
- ``cura_reference``: the same functions on the PyTorch reference (`quantize_with(None, ...)`);
- ``bitsandbytes``: its CPU backend (a native AVX-512 kernel on this machine);
- ``memory_copy`` / ``memory_write``: ``dst.copy_(src)`` and ``dst.fill_(1)`` on 64 MiB, the bandwidth
  ceiling a dequantization (which reads 0.5 + 1/64 bytes and writes 4 bytes per element) runs into.

A fresh 64 MiB output costs page faults on first touch (the kernel zeroes every page); ``*_into_reused_buffer``
(``q.dequantize(out=buffer)``) shows the decoding cost without them, ``memory_*_fresh`` the same cost for a
plain copy. Throughput is GB/s of float32 data (the input of quantize, the output of dequantize; bf16
output is counted as the float32 it stands for). Writes ``bench/results/quant.json``.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch

from cura.atomic import write_json
from cura.constants import DEFAULT_BLOCKSIZE, DEFAULT_DOUBLE_QUANT, DEFAULT_QUANT_TYPE, NESTED_BLOCKSIZE
from cura.hardware import describe_machine
from cura.quant import kernels, quantize
from cura.quant.tensor import dequantize_with, quantize_with

RESULTS = Path(__file__).parent / "results" / "quant.json"
SMOLLM2_MLP = (1536, 576)
"""A linear of the bundled 135M model (gate/up projection): what one Linear4bit forward dequantizes."""


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that load changes hit all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bits_per_parameter(w: torch.Tensor, double_quant: bool) -> dict[str, float]:
    q = quantize(w, double_quant=double_quant)
    tables = q.code.nbytes + (q.nested_code.nbytes + 4 if double_quant else 0)
    return {
        "stored_bits": q.nbytes * 8 / w.numel(),
        "stored_bits_without_code_tables": (q.nbytes - tables) * 8 / w.numel(),
    }


def bnb_quantize(w: torch.Tensor):
    return bnbf.quantize_4bit(
        w,
        blocksize=DEFAULT_BLOCKSIZE,
        quant_type=DEFAULT_QUANT_TYPE,
        compress_statistics=DEFAULT_DOUBLE_QUANT,
    )


def quantize_times(w: torch.Tensor, repeats: int) -> dict[str, float]:
    return interleaved(
        {
            "cura": lambda: quantize(w),
            "cura_reference": lambda: quantize_with(
                None, w, DEFAULT_QUANT_TYPE, DEFAULT_BLOCKSIZE, DEFAULT_DOUBLE_QUANT
            ),
            "bitsandbytes": lambda: bnb_quantize(w),
        },
        repeats,
    )


def dequantize_times(w: torch.Tensor, repeats: int) -> dict[str, float]:
    q = quantize(w)
    packed, state = bnb_quantize(w)
    buffer, source = torch.empty(w.numel()), w.reshape(-1)
    return interleaved(
        {
            "cura": lambda: q.dequantize(),
            "cura_into_reused_buffer": lambda: q.dequantize(out=buffer),
            "cura_bf16_output": lambda: q.dequantize(torch.bfloat16),
            "cura_reference": lambda: dequantize_with(None, q),
            "cura_reference_into_reused_buffer": lambda: dequantize_with(None, q, out=buffer),
            "bitsandbytes": lambda: bnbf.dequantize_4bit(packed, state),
            "memory_copy_fresh": lambda: torch.empty_like(source).copy_(source),
            "memory_copy": lambda: buffer.copy_(source),
            "memory_write": lambda: buffer.fill_(1.0),
        },
        repeats,
    )


def small_layer_times(repeats: int) -> dict[str, float]:
    """One 135M-model linear (1536 x 576, 3.5 MiB of float32: stays in cache), as in a Linear4bit step."""
    w = torch.randn(*SMOLLM2_MLP, generator=torch.Generator().manual_seed(1))
    q = quantize(w)
    packed, state = bnb_quantize(w)
    buffer = torch.empty(w.numel())
    loops = 20  # per timed call, so that one call is ~1 ms, well above the timer's resolution

    def repeat(fn):
        return lambda: [fn() for _ in range(loops)]

    times = interleaved(
        {
            "cura": repeat(lambda: q.dequantize()),
            "cura_into_reused_buffer": repeat(lambda: q.dequantize(out=buffer)),
            "cura_reference": repeat(lambda: dequantize_with(None, q)),
            "bitsandbytes": repeat(lambda: bnbf.dequantize_4bit(packed, state)),
        },
        repeats * 3,
    )
    return {name: t / loops for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    gb = w.numel() * 4 / 1e9
    lib = kernels.library()
    assert lib is not None, "the CPU kernels did not build; run with logging at DEBUG to see why"
    q, (packed, _) = quantize(w), bnb_quantize(w)
    assert torch.equal(q.packed, packed), "cura and bitsandbytes disagree on the packed bytes"

    quant = quantize_times(w, args.repeats)
    dequant = dequantize_times(w, args.repeats)
    small = small_layer_times(args.repeats)
    small_gb = SMOLLM2_MLP[0] * SMOLLM2_MLP[1] * 4 / 1e9
    copy_gbps = 2 * gb / dequant["memory_copy"]  # read + write
    write_gbps = gb / dequant["memory_write"]
    b, nb = DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE
    dequant_traffic = (0.5 + 1 / b + 4) / 4 * gb  # packed codes + 8-bit scales read, float32 written
    result = {
        "tensor": {
            "shape": list(w.shape),
            "dtype": "float32",
            "quant_type": DEFAULT_QUANT_TYPE,
            "blocksize": b,
        },
        "bits_per_parameter": {
            "double_quant": bits_per_parameter(w, True),
            "no_double_quant": bits_per_parameter(w, False),
            "formula": {"double_quant": 4 + 8 / b + 32 / (b * nb), "no_double_quant": 4 + 32 / b},
        },
        "quantize_gbps": {name: gb / s for name, s in quant.items()},
        "dequantize_gbps": {name: gb / s for name, s in dequant.items() if not name.startswith("memory")},
        "dequantize_gbps_smollm2_mlp_1536x576": {name: small_gb / s for name, s in small.items()},
        "memory_gbps": {
            "copy_read_plus_write": copy_gbps,
            "copy_fresh_output_read_plus_write": 2 * gb / dequant["memory_copy_fresh"],
            "write": write_gbps,
        },
        "ratios": {
            "quantize_cura_over_bitsandbytes": quant["bitsandbytes"] / quant["cura"],
            "quantize_cura_over_reference": quant["cura_reference"] / quant["cura"],
            "dequantize_cura_over_bitsandbytes": dequant["bitsandbytes"] / dequant["cura"],
            "dequantize_cura_into_reused_buffer_over_bitsandbytes": dequant["bitsandbytes"]
            / dequant["cura_into_reused_buffer"],
            "dequantize_cura_over_reference": dequant["cura_reference"] / dequant["cura"],
            "dequantize_cura_into_reused_buffer_over_reference": dequant["cura_reference_into_reused_buffer"]
            / dequant["cura_into_reused_buffer"],
            "dequantize_smollm2_mlp_cura_over_bitsandbytes": small["bitsandbytes"] / small["cura"],
            "dequantize_smollm2_mlp_cura_over_reference": small["cura_reference"] / small["cura"],
            # Fractions of the memory bandwidth: bytes a dequantization moves per second over what a
            # copy (read + write) or a plain write moves per second on the same buffer.
            "dequantize_cura_into_reused_buffer_traffic_over_memory_copy": dequant_traffic
            / dequant["cura_into_reused_buffer"]
            / copy_gbps,
            "dequantize_cura_into_reused_buffer_over_memory_write": gb
            / dequant["cura_into_reused_buffer"]
            / write_gbps,
        },
        "repeats": args.repeats,
        "machine": {
            **describe_machine(),
            "threads": torch.get_num_threads(),
            "kernels": "avx512" if lib.cura_simd() else "portable C",
            "load_average_1min": os.getloadavg()[0],
        },
    }
    write_json(RESULTS, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
