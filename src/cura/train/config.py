"""The run configuration: one typed home for every training default.

`cura train` flags, YAML files and the Python API all build a `TrainConfig`; nested sections are the LoRA
(`lora.*`) and data (`data.*`) configs owned by their packages. Validation happens here, once, with errors
that name the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from cura.adapters import LoraConfig
from cura.constants import (
    BLOCKSIZES,
    COMPUTE_DTYPES,
    DEFAULT_BLOCKSIZE,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_DOUBLE_QUANT,
    DEFAULT_LOSS_CHUNK_TOKENS,
    DEFAULT_QUANT_TYPE,
    QUANT_TYPES,
)
from cura.data import DataConfig
from cura.errors import CuraError

Method = Literal["qlora", "lora"]
Optimizer = Literal["paged_adamw", "paged_adamw_8bit", "adamw"]
Schedule = Literal["cosine", "constant", "linear"]
DType = Literal[COMPUTE_DTYPES]  # a tuple subscript is the same Literal as its items written out
QuantType = Literal[QUANT_TYPES]
Malloc = Literal["auto", "fast", "tight"]


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs. Defaults follow the QLoRA paper where it has one."""

    model: str = "smollm2-135m"  # a transformers folder, a .gguf file, a bnb-4bit folder or a known name
    output_dir: str = "cura-runs/run"
    method: Method = "qlora"  # qlora: 4-bit NF4 frozen base; lora: full-precision frozen base
    quant_type: QuantType = DEFAULT_QUANT_TYPE
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = DEFAULT_DOUBLE_QUANT
    # fmt: off
    compute_dtype: DType = DEFAULT_COMPUTE_DTYPE  # auto: bfloat16 where the hardware has it natively (cura.hardware)
    # fmt: on
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: Optimizer = "paged_adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    max_steps: int = 0  # 0: derived from `epochs`
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 0.3  # QLoRA's default; 0 disables clipping
    gradient_checkpointing: bool = True
    # fmt: off
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS  # logits are computed this many trained tokens at a time
    # fmt: on
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_batches: int = 0  # 0: the whole eval split
    save_every: int = 50  # checkpoint interval in optimizer steps; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    resume: bool = False
    overwrite: bool = False  # allow training into a non-empty output folder without --resume
    threads: int = 0  # CPU threads for torch; 0: all cores
    # CPU runs: tight makes RSS follow `cura estimate` (freed tensors go back to the system, steps up to 1.9x
    # slower); fast keeps glibc's default malloc (may hold up to 3x); auto: fast unless that might not fit
    cpu_malloc: Malloc = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "log_every": self.log_every}
        for key, value in positive.items():
            if value < 1:
                raise CuraError(f"config key '{key}' must be at least 1, got {value}")
        non_negative = {
            "max_steps": self.max_steps,
            "warmup_steps": self.warmup_steps,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "threads": self.threads,
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": self.weight_decay,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise CuraError(f"config key '{key}' must be zero or more, got {value}")
        if not self.lr > 0:
            raise CuraError(f"config key 'lr' must be a positive learning rate such as 2e-4, got {self.lr}")
        if self.max_steps == 0 and not self.epochs > 0:
            raise CuraError("set either 'max_steps' or a positive 'epochs'")
        if self.blocksize not in BLOCKSIZES:
            raise CuraError(
                f"config key 'blocksize' must be a power of two from 32 to 4096, got {self.blocksize}"
            )
        if self.loss_chunk_tokens < 1:
            raise CuraError("config key 'loss_chunk_tokens' must be at least 1")
        if self.keep_checkpoints < 1:
            raise CuraError("config key 'keep_checkpoints' must be at least 1")

    @property
    def seq_len(self) -> int:
        return self.data.max_length

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)
