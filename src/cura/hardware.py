"""The machine a run uses: its device and the compute dtype that is fast and safe on it.

`compute_dtype: auto` (the default) means bfloat16 where the hardware multiplies it natively, else float32:

    CUDA with bf16 support (Ampere and newer)              -> bfloat16
    x86 CPU with AVX512-BF16 or AMX-BF16 (Linux flags)     -> bfloat16  (oneDNN: ~2x float32 matmul speed)
    any other CPU (bf16 there is emulated and slower)      -> float32

Trainable LoRA weights stay float32 whatever the compute dtype (see `cura.nn.lora`), so optimizer updates
are never rounded to bf16.
"""

from __future__ import annotations

import torch

from cura.memory.devices import CPU_BF16_FLAGS as _CPU_BF16_FLAGS
from cura.memory.devices import cpu_flags as _cpu_flags

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_device() -> torch.device:
    """The device runs use: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def native_bf16(device: torch.device | str) -> bool:
    """True when `device` multiplies bfloat16 matrices in hardware (not by emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_BF16_FLAGS) and torch.backends.mkldnn.is_available()
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
