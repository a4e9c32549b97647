"""The planner's view of a run: `plan_spec(config, device)` builds `cura.memory.PlanSpec` from a TrainConfig,
and `settle_checkpointing` decides `gradient_checkpointing: auto` from the plan and the memory available.

The planner itself (`cura.memory`) is formulas over plain values and knows nothing of TrainConfig; the run's
settings are read here, on the train side, so no default lives twice. Torch-free: `cura estimate` uses it.
"""

from __future__ import annotations

import dataclasses

from cura.errors import CuraError
from cura.memory import PlanSpec, format_bytes, plan, resolve_compute_dtype, shape_from_source
from cura.memory.allocator import fast_malloc_bound
from cura.train.config import TrainConfig
from cura.train.preference_config import PAIRED


def plan_spec(
    config: TrainConfig,
    device: str,
    *,
    method: str | None = None,
    native_bf16: bool | None = None,
    world_size: int = 1,
) -> PlanSpec:
    """Every input comes from `config`; `device` is "cpu" or "cuda", `method` may be "full" (which
    TrainConfig does not train but the planner compares against), `native_bf16` says whether the device has
    bfloat16 (for `compute_dtype: auto`; None: `cura.memory.resolve_compute_dtype`'s assumption).
    `gradient_checkpointing` must be settled first (`settle_checkpointing`): the two plans differ."""
    if not isinstance(config.gradient_checkpointing, bool):
        raise ValueError(
            "plan_spec needs gradient_checkpointing true or false: settle 'auto' with settle_checkpointing first"
        )
    targets = config.lora.target_modules
    return PlanSpec(
        method=method or config.method,
        quant_type=config.quant_type,
        double_quant=config.double_quant,
        blocksize=config.blocksize,
        lora_r=config.lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_exclude=tuple(config.lora.exclude),
        lora_dropout=config.lora.dropout,
        optimizer=config.optimizer,
        compute_dtype=resolve_compute_dtype(config.compute_dtype, device, native_bf16),
        batch_size=config.batch_size,
        seq_len=config.data.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
        loss_chunk_tokens=config.loss_chunk_tokens,
        packing=config.data.packing and config.objective == "sft",  # preference batches are padded
        device=device,
        world_size=world_size,
        fsdp=config.fsdp and world_size > 1,
        sequences_per_example=2 if config.objective in PAIRED else 1,
        sft_loss=config.objective == "sft",
        cpu_pool=device == "cpu" and uses_pool(config),
    )


def uses_pool(config: TrainConfig) -> bool:
    """Whether a CPU run of `config` allocates its tensors from cura's pool: `cpu_malloc` pool or auto, where
    the pool can be built (`cura.train.cpu_pool.buildable`; torch-free)."""
    from cura.train import cpu_pool

    return config.cpu_malloc in ("pool", "auto") and cpu_pool.buildable() is None


AUTO_CHECKPOINTING_SHARE = 0.8
"""`gradient_checkpointing: auto` keeps every layer's activations only when the plan without recompute takes at
most this part of the memory available: the planner is within 10% of measured peaks (bench/memory.py), and
the rest is left to whatever else the machine runs. On a CPU with glibc's default malloc (`cpu_malloc: fast`,
or auto where cura's pool cannot be built) the bound is `cura.memory.allocator.fast_malloc_bound` instead,
the most that malloc may hold."""


def keeps_freed_memory(config: TrainConfig, device: str) -> bool:
    """Whether the run's CPU allocator may hold far more than the plan: glibc's default malloc, which
    `cpu_malloc: fast` keeps, and `auto` where cura's pool cannot be built (`cura.train.cpu_pool.buildable`).
    cura's pool and tight hold the plan; a GPU's memory is the plan's by its own caching allocator."""
    if device != "cpu":
        return False
    return config.cpu_malloc == "fast" or (config.cpu_malloc == "auto" and not uses_pool(config))


def settle_checkpointing(
    config: TrainConfig,
    device: str,
    available: int | None,
    *,
    native_bf16: bool | None = None,
    world_size: int = 1,
    shape=None,
) -> tuple[TrainConfig, str | None]:
    """(`config` with gradient_checkpointing true or false, the sentence that says why or None when the config
    set it). `auto` is off, the faster choice (no layer is run twice), when the run's plan without recompute
    fits in `available` bytes with the margin above; on when it does not, when `available` is unknown (None),
    when the planner cannot read the model's shape, or under torchrun (`world_size` > 1: every rank must
    choose alike, and their free memory is not compared). `shape`: the model's, when the caller has read it."""
    setting = config.gradient_checkpointing
    if isinstance(setting, bool):
        return config, None
    on = dataclasses.replace(config, gradient_checkpointing=True)
    prefix = "gradient_checkpointing auto: on, each layer is recomputed in backward"
    if world_size > 1:
        return on, f"{prefix} (several processes: set it to false to keep activations on every rank)"
    if available is None:
        return on, f"{prefix} (the memory available is not known here)"
    try:
        shape = shape or shape_from_source(config.model)
    except CuraError:
        return on, f"{prefix} (the planner cannot read this model's shape)"
    off = dataclasses.replace(config, gradient_checkpointing=False)
    peak = plan(shape, plan_spec(off, device, native_bf16=native_bf16)).peak_bytes
    needs = int(peak / AUTO_CHECKPOINTING_SHARE)
    if keeps_freed_memory(config, device):
        needs = max(needs, fast_malloc_bound(peak))
    if needs <= available:
        return off, (
            f"gradient_checkpointing auto: off, every layer's activations are kept (no recompute): the plan "
            f"without checkpointing, {format_bytes(peak)}, fits in the {format_bytes(available)} available"
        )
    return on, (
        f"{prefix}: without it the plan is {format_bytes(peak)}, and {format_bytes(needs)} would have to be "
        f"free ({format_bytes(available)} is)"
    )
