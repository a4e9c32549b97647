"""Checks a run passes before a model is loaded: the sequence fits the model's context, and the planned peak
fits the memory the device has. Each failure is one sentence with the fix; nothing is written. Before them,
`settle_for_device` decides `gradient_checkpointing: auto` against the same memory figure.

    context   data.max_length <= the model's context length (config.json `max_position_embeddings`, the
              GGUF's `<arch>.context_length`), when the source says it
    memory    the planned peak (`cura.memory.plan`) <= what the device can give: MemAvailable on a CPU,
              the free memory of the GPU on CUDA
"""

from __future__ import annotations

from cura.errors import CuraError
from cura.memory import format_bytes
from cura.memory.shapes import ModelShape


def check_context(shape: ModelShape, max_length: int, model: str) -> None:
    """CuraError when `data.max_length` is longer than the model's context."""
    if shape.context_length and max_length > shape.context_length:
        raise CuraError(
            f"data.max_length (--seq-len) is {max_length:,} tokens but {model} was trained for at most "
            f"{shape.context_length:,}: use --seq-len {shape.context_length} or less"
        )


def check_memory(peak_bytes: int, available_bytes: int | None, where: str) -> None:
    """CuraError when the planned peak is more than `available_bytes` (None: unknown, nothing checked)."""
    if available_bytes is None or peak_bytes <= available_bytes:
        return
    raise CuraError(
        f"this run plans a peak of {format_bytes(peak_bytes)} but {where} has {format_bytes(available_bytes)} "
        f"available: add --auto-fit {format_bytes(int(available_bytes * 0.9)).replace(' ', '')} to shrink it "
        "(or lower --batch-size / --seq-len; `cura estimate` shows each term; --force starts it anyway)"
    )


def device_available_bytes(device_type: str) -> tuple[int | None, str]:
    """(bytes available to this run, how to name the device in a message)."""
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return free, f"GPU {torch.cuda.get_device_name(0)}"
    from cura.memory.allocator import available_memory

    return available_memory(), "this machine (MemAvailable)"


def settle_for_device(config, device, world_size: int = 1, say=None, shape=None):
    """`config` with `gradient_checkpointing: auto` decided for `device` (a torch.device) from its free memory
    (`cura.train.plan.settle_checkpointing`; `shape` when read already); says why through `say` when it
    decided."""
    from cura.hardware import native_bf16
    from cura.train.plan import settle_checkpointing

    if isinstance(config.gradient_checkpointing, bool):
        return config
    available = device_available_bytes(device.type)[0] if world_size == 1 else None
    config, why = settle_checkpointing(
        config, device.type, available, native_bf16=native_bf16(device), world_size=world_size, shape=shape
    )
    if say is not None and why:
        say(why)
    return config


def preflight(config, device) -> None:
    """Both checks for `config` on `device` (a torch.device); a source whose shape the planner cannot read
    is left to the loader, which says what is wrong with it."""
    from cura.hardware import native_bf16
    from cura.memory import plan, shape_from_source
    from cura.train.plan import plan_spec

    try:
        shape = shape_from_source(config.model)
    except CuraError:
        return
    check_context(shape, config.data.max_length, config.model)
    config = settle_for_device(config, device, shape=shape)  # `cura train` has settled it already
    peak = plan(shape, plan_spec(config, device.type, native_bf16=native_bf16(device))).peak_bytes
    available, where = device_available_bytes(device.type)
    if getattr(config, "force", False):  # the user insists (--force): the loader or the OS will tell
        return
    check_memory(peak, available, where)
