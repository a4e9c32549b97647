"""The machine a run uses: its device and the compute dtype that is fast and safe on it.

`compute_dtype: auto` (the default) means bfloat16 where the hardware multiplies it natively, else float32:

    CUDA with bf16 support (Ampere and newer)              -> bfloat16
    x86 CPU with AVX512-BF16 or AMX-BF16 (Linux flags)     -> bfloat16  (oneDNN: ~2x float32 matmul speed)
    any other CPU (bf16 there is emulated and slower)      -> float32

Trainable LoRA weights stay float32 whatever the compute dtype (see `cura.nn.lora`), so optimizer updates
are never rounded to bf16.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from cura.constants import COMPUTE_DTYPES
from cura.memory.devices import CPU_BF16_FLAGS as _CPU_BF16_FLAGS
from cura.memory.devices import cpu_flags as _cpu_flags
from cura.memory.devices import onednn_capped_below_bf16

__all__ = ["COMPUTE_DTYPES", "default_device", "describe_machine", "native_bf16", "resolve_compute_dtype"]


def default_device() -> torch.device:
    """The device runs use: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def native_bf16(device: torch.device | str) -> bool:
    """True when `device` multiplies bfloat16 matrices in hardware (not by emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        has_flag = any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS)
        return has_flag and torch.backends.mkldnn.is_available() and not onednn_capped_below_bf16()
    return False


def resolve_compute_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The torch dtype for a `compute_dtype` setting ("auto" or a dtype name) on `device`."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


# the instruction-set flags that decide CPU speed (Linux /proc/cpuinfo names)
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """What a benchmark or a timing ran on, so numbers from different machines are never compared as one:
    CPU model and the flags that decide its speed, cores, the SIMD level PyTorch's kernels use, whether bf16
    is native, the compute dtype `auto` picks, and the GPU if any."""
    import os

    flags = _cpu_flags()
    cpu = torch.device("cpu")
    out = {
        "cpu": cpu_model_name(),
        "cpu_flags": [f for f in CPU_FEATURES if f in flags],
        "cpu_kind": cpu_kind(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16_cpu": native_bf16(cpu),
        "compute_dtype_auto": str(resolve_compute_dtype("auto", default_device())).removeprefix("torch."),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def cpu_kind() -> str:
    """One word for the class of CPU the README quotes times for: 'bf16' (AVX512-BF16 or AMX: bfloat16
    compute), 'avx512' (float32 with AVX-512), 'avx2' (float32 with AVX2 only), or 'other'."""
    flags = _cpu_flags()
    if native_bf16("cpu"):
        return "bf16"
    if "avx512f" in flags and "AVX512" in torch.backends.cpu.get_cpu_capability():
        return "avx512"
    return "avx2" if "avx2" in flags else "other"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (Linux sysfs topology: one per distinct
    (package, core) pair, so hyperthread siblings count once); os.cpu_count() where that is unknown."""
    import os

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(
                (
                    topology.joinpath("physical_package_id").read_text(),
                    topology.joinpath("core_id").read_text(),
                )
            )
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def default_threads() -> int | None:
    """Torch threads for a CPU run that sets none: one per physical core (a hyperthread sibling shares its
    core's vector units, so a second matmul thread on it mostly waits); None when OMP_NUM_THREADS is set
    (the user's choice stands)."""
    import os

    return None if os.environ.get("OMP_NUM_THREADS") else physical_cores()
