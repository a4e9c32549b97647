"""`PlanSpec` from a `TrainConfig`: the planner reads the run's own settings, so no default lives twice."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cura.memory.planner import PlanSpec

if TYPE_CHECKING:
    from cura.train.config import TrainConfig


def resolve_compute_dtype(name: str, device: str, native_bf16: bool | None = None) -> str:
    """A concrete dtype name for a `compute_dtype` setting, as `cura.hardware.resolve_compute_dtype` picks it:
    "auto" is bfloat16 where the device multiplies it natively, else float32. On CUDA a GPU of unknown model
    is taken to be Ampere or newer (bf16); on the CPU this machine's flags decide."""
    if name != "auto":
        return name
    if native_bf16 is None:
        if device == "cuda":
            native_bf16 = True
        else:
            from cura.hardware import native_bf16 as cpu_native_bf16

            native_bf16 = cpu_native_bf16("cpu")
    return "bfloat16" if native_bf16 else "float32"


def spec_from_config(
    config: TrainConfig, device: str, *, method: str | None = None, native_bf16: bool | None = None
) -> PlanSpec:
    """The planner's view of a run: every input comes from `config`; `device` is "cpu" or "cuda", `method`
    may be "full" (which `TrainConfig` does not train but the planner compares against), `native_bf16`
    says whether the device has bfloat16 (for `compute_dtype: auto`; None: assume as documented above)."""
    targets = config.lora.target_modules
    return PlanSpec(
        method=method or config.method,
        quant_type=config.quant_type,
        double_quant=config.double_quant,
        blocksize=config.blocksize,
        lora_r=config.lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=config.lora.dropout,
        optimizer=config.optimizer,
        compute_dtype=resolve_compute_dtype(config.compute_dtype, device, native_bf16),
        batch_size=config.batch_size,
        seq_len=config.data.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
        loss_chunk_tokens=config.loss_chunk_tokens,
        packing=config.data.packing,
        device=device,
    )
