"""The compute dtype policy: bfloat16 where the hardware has it, float32 elsewhere."""

import pytest
import torch

from cura import hardware


def test_explicit_names_and_dtypes_pass_through():
    assert hardware.resolve_compute_dtype("float32", "cpu") is torch.float32
    assert hardware.resolve_compute_dtype("bfloat16", "cpu") is torch.bfloat16
    assert hardware.resolve_compute_dtype(torch.float16, "cpu") is torch.float16
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        hardware.resolve_compute_dtype("int8", "cpu")


def test_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert hardware.resolve_compute_dtype("auto", "cpu") is torch.float32  # bf16 would be emulated
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.resolve_compute_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert hardware.resolve_compute_dtype("auto", "cpu") is torch.bfloat16


def test_this_machines_flags_are_read():
    flags = hardware._cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    assert hardware.native_bf16("cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
