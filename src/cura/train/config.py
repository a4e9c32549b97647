"""The run configuration: one typed home for every training default.

`cura train` flags, YAML files and the Python API all build a `TrainConfig`; nested sections are the LoRA
(`lora.*`) and data (`data.*`) configs owned by their packages. Validation happens here, once, with errors
that name the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, get_args

from cura.adapters import LoraConfig
from cura.constants import (
    BLOCKSIZES,
    COMPUTE_DTYPES,
    DEFAULT_BLOCKSIZE,
    DEFAULT_COMPUTE_DTYPE,
    DEFAULT_DOUBLE_QUANT,
    DEFAULT_LOSS_CHUNK_TOKENS,
    DEFAULT_QUANT_TYPE,
    PAGING_MODES,
    QUANT_TYPES,
)
from cura.data import DataConfig
from cura.errors import CuraError
from cura.train.preference_config import PreferenceConfig
from cura.validate import check_train_config

Method = Literal["qlora", "lora"]
Optimizer = Literal["paged_adamw", "paged_adamw_8bit", "adamw"]
Paging = Literal[PAGING_MODES]
Schedule = Literal["cosine", "constant", "linear"]
DType = Literal[COMPUTE_DTYPES]  # a tuple subscript is the same Literal as its items written out
QuantType = Literal[QUANT_TYPES]
Malloc = Literal["auto", "pool", "fast", "tight"]
Reporter = Literal["none", "tensorboard", "wandb", "mlflow"]

MAX_LR = 1.0
"""The largest learning rate accepted: each AdamW step moves every weight by about lr, and LoRA weights start
below 1, so above 1 the loss cannot improve (it stalls or the weights overflow)."""
Objective = Literal["sft", "dpo", "orpo", "kto"]  # cura.train.preference_config.OBJECTIVES


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs. Defaults follow the QLoRA paper where it has one."""

    model: str = "smollm2-135m"
    """the base: a transformers folder, a .gguf file, a bitsandbytes 4-bit folder or a known name"""
    output_dir: str = "cura-runs/run"
    """where the run writes its adapter, checkpoints, metrics.jsonl, summary.json and loss.png"""
    method: Method = "qlora"
    """qlora: frozen 4-bit base; lora: frozen full-precision base"""
    quant_type: QuantType = DEFAULT_QUANT_TYPE
    """4-bit code of the base: nf4 (NormalFloat, QLoRA's) or fp4"""
    blocksize: int = DEFAULT_BLOCKSIZE
    """weights per 4-bit scale (absmax), a power of two from 32 to 4096"""
    double_quant: bool = DEFAULT_DOUBLE_QUANT
    """quantize the scales too (8-bit, blocks of 256): 4.127 instead of 4.5 bits per weight"""
    compute_dtype: DType = DEFAULT_COMPUTE_DTYPE
    """dtype of the matmuls; auto: bfloat16 where the hardware has it natively, else float32"""
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Objective = "sft"
    """sft (next-token loss on the answers), or preference tuning on pairs: dpo, orpo; kto on labelled answers"""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    optimizer: Optimizer = "paged_adamw"
    """paged AdamW with 32-bit or 8-bit state, or torch's AdamW"""
    optim_paging: Paging = "auto"
    """paged AdamW's state: auto: on the GPU while it fits, host memory under pressure; always: host; never: GPU"""
    lr: float = 2e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay of the LoRA weights"""
    adam_beta1: float = 0.9
    """AdamW beta1"""
    adam_beta2: float = 0.999
    """AdamW beta2"""
    schedule: Schedule = "cosine"
    """learning-rate schedule after warmup"""
    warmup_steps: int = 0
    """optimizer steps of linear warmup"""
    max_steps: int = 0
    """optimizer steps to train; 0: derived from epochs"""
    epochs: float = 1.0
    """passes over the training split when max_steps is 0"""
    batch_size: int = 4
    """sequences per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    max_grad_norm: float = 0.3
    """gradient clipping norm (QLoRA's default); 0 disables clipping"""
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    """recompute each layer in backward instead of keeping its activations; auto: only when the plan without
    it does not fit the memory available (cura.train.plan.settle_checkpointing)"""
    fsdp: bool = False
    """with --nproc N / torchrun: shard the 4-bit base, LoRA weights and optimizer state across the N processes (FSDP2)"""
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS
    """the loss computes logits for this many trained tokens at a time"""
    seed: int = 0
    """seed of the LoRA init, data order and dropout"""
    eval_every: int = 0
    """held-out loss every N steps; 0: only before and after training"""
    eval_batches: int = 0
    """held-out batches per evaluation; 0: the whole eval split"""
    save_every: int = 50
    """checkpoint interval in optimizer steps; 0: only at the end"""
    keep_checkpoints: int = 2
    """checkpoints kept (the newest)"""
    log_every: int = 1
    """write a metrics.jsonl line every N steps"""
    max_bad_steps: int = 5
    """non-finite steps in a row before the run stops"""
    resume: bool = False
    """continue from the newest complete checkpoint in output_dir"""
    overwrite: bool = False
    """train over an earlier run in output_dir: what it wrote (checkpoints included) is deleted first"""
    allow_change: str = ""
    """with resume: comma-separated keys allowed to differ from the run's record (e.g. lr,max_steps)"""
    threads: int = 0
    """CPU threads for torch; 0: all cores"""
    cpu_malloc: Malloc = "auto"
    """CPU runs: pool, cura's caching allocator, keeps memory within `cura estimate` at full speed (needs a C++ compiler); tight makes glibc follow it (steps up to 1.9x slower); fast keeps glibc's default (may hold up to 3.5x); auto: pool where it builds, else fast unless that might not fit"""
    progress: bool = True
    """show progress bars"""
    report_to: tuple[Reporter, ...] = ()
    """experiment trackers that also get the run, comma-separated: tensorboard, wandb, mlflow (offline by default)"""
    force: bool = False
    """start even when the memory plan says the run does not fit the memory available"""

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
        if not 0 < self.lr <= MAX_LR:  # also refuses nan and inf
            raise CuraError(
                f"config key 'lr' must be a learning rate above 0 and at most {MAX_LR:g} (LoRA usually trains "
                f"at 1e-5 to 1e-3; an AdamW step moves each weight by about lr), got {self.lr}"
            )
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
        self.report_to = reporters(self.report_to)
        check_train_config(self)  # finite numbers, ranges, threads, output_dir (cura.validate)

    @property
    def seq_len(self) -> int:
        return self.data.max_length

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def reporters(value) -> tuple[str, ...]:
    """`report_to` as tracker names without 'none' or repeats (the Python API may pass 'tensorboard,wandb')."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    allowed = get_args(Reporter)
    for name in names:
        if name not in allowed:
            raise CuraError(
                f"config key 'report_to' takes {', '.join(allowed)} (comma-separated), got {name!r}"
            )
    return tuple(dict.fromkeys(n for n in names if n != "none"))
