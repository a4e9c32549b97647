"""Concrete settings for the planner: the compute dtype that `compute_dtype: auto` means on a device.

Torch-free (`cura estimate` never imports torch): the CPU's bfloat16 support is read from its flags
(`cura.memory.devices.cpu_native_bf16`), the same reading `cura.hardware` uses. The `PlanSpec` of a run is
built on the train side, by `cura.train.plan.plan_spec`.
"""

from __future__ import annotations

from cura.memory.devices import cpu_native_bf16


def resolve_compute_dtype(name: str, device: str, native_bf16: bool | None = None) -> str:
    """A concrete dtype name for a `compute_dtype` setting, as `cura.hardware.resolve_compute_dtype` picks it:
    "auto" is bfloat16 where the device multiplies it natively, else float32. On CUDA a GPU of unknown model
    is taken to be Ampere or newer (bf16); on the CPU this machine's flags decide."""
    if name != "auto":
        return name
    if native_bf16 is None:
        native_bf16 = True if device == "cuda" else cpu_native_bf16()
    return "bfloat16" if native_bf16 else "float32"
