"""Benchmark the 4-bit format: storage bits per parameter and CPU throughput of cura vs bitsandbytes.

    python bench/quant.py [--size 4096] [--repeats 7]

Both libraries run on the same 4096 x 4096 float32 tensor in the same process, interleaved, and the medians
are compared as ratios (the machine may be shared, so absolute numbers are noisy). A fresh 64 MiB output
costs page faults on first touch; "cura_into_reused_buffer" (``q.dequantize(out=buffer)``) shows the
decoding cost without them. Throughput is GB/s of
float32 data (the input of quantize, the output of dequantize); the memory copy reference is
``torch.empty_like(x).copy_(x)`` counted as read + write. Writes ``bench/results/quant.json``.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch

from cura.quant import quantize

RESULTS = Path(__file__).parent / "results" / "quant.json"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (caches, lazy tables)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    gb = w.numel() * 4 / 1e9
    q = quantize(w)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, packed), "cura and bitsandbytes disagree on the packed bytes"

    quant = interleaved(
        {
            "cura": lambda: quantize(w),
            "bitsandbytes": lambda: bnbf.quantize_4bit(
                w, blocksize=64, quant_type="nf4", compress_statistics=True
            ),
        },
        args.repeats,
    )
    buffer = torch.empty(w.numel())
    dequant = interleaved(
        {
            "cura": lambda: q.dequantize(),
            "cura_into_reused_buffer": lambda: q.dequantize(out=buffer),
            "bitsandbytes": lambda: bnbf.dequantize_4bit(packed, state),
            "copy": lambda: torch.empty_like(w).copy_(w),
        },
        args.repeats,
    )
    copy_gbps = 2 * gb / dequant.pop("copy")
    result = {
        "tensor": {"shape": list(w.shape), "dtype": "float32", "quant_type": "nf4", "blocksize": 64},
        "bits_per_parameter": {
            "double_quant": bits_per_parameter(w, True),
            "no_double_quant": bits_per_parameter(w, False),
            "formula": {"double_quant": 4 + 8 / 64 + 32 / (64 * 256), "no_double_quant": 4 + 32 / 64},
        },
        "quantize_gbps": {name: gb / s for name, s in quant.items()},
        "dequantize_gbps": {name: gb / s for name, s in dequant.items()},
        "memory_copy_gbps_read_plus_write": copy_gbps,
        "ratios": {
            "quantize_cura_over_bitsandbytes": quant["bitsandbytes"] / quant["cura"],
            "dequantize_cura_over_bitsandbytes": dequant["bitsandbytes"] / dequant["cura"],
            "dequantize_cura_into_reused_buffer_over_bitsandbytes": dequant["bitsandbytes"]
            / dequant["cura_into_reused_buffer"],
            "dequantize_cura_over_memory_copy": (gb / dequant["cura"]) / copy_gbps,
        },
        "repeats": args.repeats,
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": os.getloadavg()[0],
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
