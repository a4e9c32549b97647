"""The planner's inputs and outputs: `PlanSpec` (a run's settings that decide its memory), `Term` and
`MemoryPlan`; and the compute dtype that `compute_dtype: auto` means on a device.

Torch-free (`cura estimate` never imports torch): the CPU's bfloat16 support is read from its flags
(`cura.memory.devices.cpu_native_bf16`), the same reading `cura.hardware` uses. The `PlanSpec` of a run is
built on the train side, by `cura.train.plan.plan_spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cura.constants import QUANT_TYPES
from cura.errors import CuraError
from cura.memory.devices import cpu_native_bf16
from cura.memory.shapes import ModelShape

Method = Literal["full", "lora", "qlora"]
Device = Literal["cpu", "cuda"]

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("paged_adamw", "paged_adamw_8bit", "adamw")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class PlanSpec:
    """The settings of a run that decide its memory. A run's is built by `cura.train.plan.plan_spec` (so the
    defaults are TrainConfig's).

    `lora_targets` is "all-linear" or module names (q_proj, ..., down_proj); `lora_exclude` names modules that
    get no adapter, matched as `cura.adapters` does (see `layer_targets`). `packing` means batches carry a
    (B, 1, T, T) attention mask (packed rows or padding), which also makes attention repeat K/V heads.
    `device` is "cuda" (GPU memory: what `torch.cuda.max_memory_allocated` counts, plus the CUDA context)
    or "cpu" (the process's resident memory, RSS, with cura's pool, `cura train`'s default, or glibc's mmap
    threshold fixed, cpu_malloc=tight; glibc's default may hold up to FAST_RETENTION times more:
    `cura.memory.allocator`).
    """

    method: Method
    quant_type: str
    double_quant: bool
    blocksize: int
    lora_r: int
    lora_targets: str | tuple[str, ...]
    lora_dropout: float
    optimizer: str
    compute_dtype: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    loss_chunk_tokens: int
    packing: bool
    device: Device
    lora_exclude: tuple[str, ...] = ()
    world_size: int = 1  # data-parallel processes (`cura train --nproc`); batch_size is per process
    fsdp: bool = False  # with world_size > 1: base, LoRA and optimizer state sharded (`cura.memory.sharding`)
    sequences_per_example: int = 1  # 2 for DPO/ORPO: chosen and rejected go through the model in one batch
    sft_loss: bool = True  # `loss_sum` (the gradient in place); False: a preference objective
    cpu_pool: bool = False  # a CPU run on cura's pool (`cura.train.cpu_pool`): its headroom is a term

    def __post_init__(self) -> None:
        checks = (
            ("method", self.method in METHODS, ", ".join(METHODS)),
            ("optimizer", self.optimizer in OPTIMIZERS, ", ".join(OPTIMIZERS)),
            ("compute_dtype", self.compute_dtype in DTYPE_BYTES, ", ".join(DTYPE_BYTES)),
            ("device", self.device in ("cpu", "cuda"), "cpu, cuda"),
            ("quant_type", self.quant_type in QUANT_TYPES, ", ".join(QUANT_TYPES)),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise CuraError(f"planner setting '{key}' is {getattr(self, key)!r}; use one of {allowed}")
        for key in (
            "batch_size",
            "seq_len",
            "lora_r",
            "loss_chunk_tokens",
            "blocksize",
            "world_size",
            "sequences_per_example",
        ):
            if getattr(self, key) < 1:
                raise CuraError(f"planner setting '{key}' must be at least 1, got {getattr(self, key)}")
        if self.seq_len < 2:
            raise CuraError(f"planner setting 'seq_len' must be at least 2 tokens, got {self.seq_len}")

    @property
    def e(self) -> int:
        """Bytes per element of the compute dtype (activations, non-quantized parameters, LoRA's casts)."""
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def rows(self) -> int:
        """Sequences in one forward: the batch, times 2 for a pair objective (chosen + rejected)."""
        return self.batch_size * self.sequences_per_example

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    @property
    def trained_tokens(self) -> int:
        return self.rows * (self.seq_len - 1)

    @property
    def chunk(self) -> int:
        return min(self.loss_chunk_tokens, self.trained_tokens)

    @property
    def param_bytes(self) -> int:
        """Bytes per trained parameter: 4. LoRA weights are float32 master weights whatever the compute dtype
        (`cura.nn.lora`: cast to the compute dtype on the fly); full fine-tuning keeps float32 masters too."""
        return 4

    @property
    def eight_bit(self) -> bool:
        return self.optimizer.endswith("_8bit")

    @property
    def paged(self) -> bool:
        return self.optimizer.startswith("paged")


@dataclass(frozen=True)
class Term:
    """One named amount of memory with the formula that produced it, filled in with this run's numbers."""

    name: str
    bytes: int
    formula: str


@dataclass(frozen=True)
class MemoryPlan:
    """The terms alive at the peak, their sum (`peak_bytes`) and which phase of the step that peak is in.

    `phases` gives each candidate phase's total; `host_bytes` is what stays in host memory (paged optimizer
    state on a GPU) and is not part of the device peak.
    """

    shape: ModelShape
    spec: PlanSpec
    terms: tuple[Term, ...]
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)

    def fits(self, budget_bytes: int) -> bool:
        return self.peak_bytes <= budget_bytes


def resolve_compute_dtype(name: str, device: str, native_bf16: bool | None = None) -> str:
    """A concrete dtype name for a `compute_dtype` setting, as `cura.hardware.resolve_compute_dtype` picks it:
    "auto" is bfloat16 where the device multiplies it natively, else float32. On CUDA a GPU of unknown model
    is taken to be Ampere or newer (bf16); on the CPU this machine's flags decide."""
    if name != "auto":
        return name
    if native_bf16 is None:
        native_bf16 = True if device == "cuda" else cpu_native_bf16()
    return "bfloat16" if native_bf16 else "float32"
