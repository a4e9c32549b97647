"""Memory sizes and GPU names: "12GB", "12GiB", "24G", "16000MiB", "rtx-4090", "a100-80gb".

Units are binary everywhere (1 GB = 1 GiB = 2**30 bytes), because that is how GPU memory is sold and
reported: a "24 GB" RTX 4090 has 24,564 MiB, an "80 GB" A100 has 81,920 MiB (nvidia-smi), and PyTorch's
`torch.cuda.get_device_properties(0).total_memory` counts the same bytes.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cura.errors import CuraError

MiB, GiB = 2**20, 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Gpu:
    """A GPU model and the memory the driver reports for it (nvidia-smi 'Total', MiB)."""

    name: str
    memory_mib: int
    label: str
    bf16: bool = True  # multiplies bfloat16 natively (Ampere and newer); T4 and V100 do not

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MiB


# Totals as nvidia-smi reports them (slightly under the nominal size where ECC or the driver reserves some).
GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu("rtx-3060", 12288, "GeForce RTX 3060 12 GB"),
        Gpu("rtx-3080", 10240, "GeForce RTX 3080 10 GB"),
        Gpu("rtx-3090", 24576, "GeForce RTX 3090 24 GB"),
        Gpu("rtx-4090", 24564, "GeForce RTX 4090 24 GB"),
        Gpu("t4", 15360, "Tesla T4 16 GB", bf16=False),
        Gpu("v100", 16160, "Tesla V100 16 GB", bf16=False),
        Gpu("l4", 23034, "L4 24 GB"),
        Gpu("a10g", 23028, "A10G 24 GB"),
        Gpu("a10", 23028, "A10 24 GB"),
        Gpu("l40s", 46068, "L40S 48 GB"),
        Gpu("rtx-a6000", 49140, "RTX A6000 48 GB"),
        Gpu("a100-40gb", 40960, "A100 40 GB"),
        Gpu("a100-80gb", 81920, "A100 80 GB"),
        Gpu("h100", 81559, "H100 80 GB"),
        Gpu("h200", 143771, "H200 141 GB"),
    )
}

# The memory classes shown in `cura estimate`'s "fits on" line (nominal sizes, GiB).
COMMON_SIZES_GB = (8, 12, 16, 24, 40, 48, 80)


@dataclass(frozen=True)
class MemoryBudget:
    """How much memory a run may use, and where: `device` is "cuda" for a GPU name, None for a plain size."""

    bytes: int
    label: str
    device: str | None
    bf16: bool | None = None  # known for a named GPU


def parse_size(text: str) -> int:
    """Bytes of a size string: a number and an optional binary unit (B, K, M, G, T, with or without 'B'/'iB')."""
    match = _SIZE.match(str(text))
    if not match:
        raise CuraError(
            f"'{text}' is not a memory size: write a number and a unit such as 12GB, 12GiB, 24G or 16000MiB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise CuraError(f"memory size '{text}' must be more than zero, e.g. 12GB")
    return int(value)


def _gpu_key(text: str) -> str:
    key = text.strip().lower().replace("_", "-").replace(" ", "-")
    return key.removeprefix("nvidia-").removeprefix("geforce-")


def resolve_memory(text: str) -> MemoryBudget:
    """A size string ("12GB") or a GPU name ("rtx-4090", "A100-80GB") as a MemoryBudget; CuraError otherwise."""
    key = _gpu_key(str(text))
    if key in GPUS:
        gpu = GPUS[key]
        return MemoryBudget(gpu.memory_bytes, f"{gpu.label} ({gpu.memory_mib:,} MiB)", "cuda", gpu.bf16)
    if _SIZE.match(str(text)):
        size = parse_size(text)
        return MemoryBudget(size, format_bytes(size), None)
    raise CuraError(
        f"'{text}' is neither a memory size nor a known GPU: write a size such as 12GB or 24GiB, or one of "
        f"{', '.join(GPUS)}"
    )


def format_bytes(n: float) -> str:
    """Binary units with three significant digits: 512 B, 1.50 KiB, 23.4 MiB, 5.05 GiB."""
    n = float(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{n:.0f} B"


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""x86 flags of native bfloat16 matrix multiplies (oneDNN uses them; elsewhere bf16 is emulated, slower)."""


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    if platform.system() != "Linux":
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (by its flags; `cura.hardware.native_bf16` also
    asks torch whether its oneDNN backend is built in, which every x86 wheel has), unless oneDNN is capped
    below its bf16 instructions."""
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS) and not onednn_capped_below_bf16()


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it has no bf16 instructions
_NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_capped_below_bf16() -> bool:
    """True when ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) keeps oneDNN off its bf16 instructions: torch's
    bf16 matmuls are then emulated, as on a CPU without them (how bench/train_cpu.py measures an AVX2 CPU
    on a newer one)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    return cap.strip().upper() in _NO_BF16_ISAS
