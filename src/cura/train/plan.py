"""The planner's view of a run: `plan_spec(config, device)` builds `cura.memory.PlanSpec` from a TrainConfig.

The planner itself (`cura.memory`) is formulas over plain values and knows nothing of TrainConfig; the run's
settings are read here, on the train side, so no default lives twice. Torch-free: `cura estimate` uses it.
"""

from __future__ import annotations

from cura.memory import PlanSpec, resolve_compute_dtype
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
    bfloat16 (for `compute_dtype: auto`; None: `cura.memory.resolve_compute_dtype`'s assumption)."""
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
    )
