"""`BaseSpec`: the whole description of the frozen base a LoRA adapter was trained on.

Training writes one with every adapter and checkpoint (`cura_adapter.json`, key "base"); generate, chat,
eval, merge and export rebuild exactly that base from it (`cura.adapters.load_base_for_adapter`):

    source          cura's name for the model: a known name ("smollm2-135m") or an absolute path
    method          "qlora" (4-bit frozen base) or "lora" (full-precision frozen base)
    quant_type      "nf4" | "fp4"            } how each target linear was quantized (qlora only)
    blocksize       elements per absmax      }
    double_quant    absmax quantized again   }
    skip_modules    linears kept in full precision (module-name suffixes, e.g. "lm_head")
    compute_dtype   "float32" | "bfloat16" | "float16", as resolved for the run
    chat_template   the template text training formatted the data with, its sha256, and where it came
                    from: "tokenizer" (the base's own) or "fallback" (cura's ChatML, the base had none)

The record is plain data (this module imports no torch): tools can read it without loading a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cura.constants import DEFAULT_BLOCKSIZE, DEFAULT_DOUBLE_QUANT, DEFAULT_LORA_EXCLUDE, DEFAULT_QUANT_TYPE
from cura.errors import CuraError
from cura.models.sources import KNOWN_NAMES

METHODS = ("qlora", "lora")


def normalize_source(source: str | Path) -> str:
    """A model source as recorded: a known name as is, a path made absolute (so it means the same from any
    folder)."""
    text = str(source)
    return text if text in KNOWN_NAMES else str(Path(text).expanduser().resolve())


def template_sha256(template: str | None) -> str | None:
    return hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None


@dataclass(frozen=True)
class BaseSpec:
    """How the base was built for training (see the module docstring for each field)."""

    source: str
    method: str = "qlora"
    quant_type: str = DEFAULT_QUANT_TYPE
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = DEFAULT_DOUBLE_QUANT
    skip_modules: tuple[str, ...] = DEFAULT_LORA_EXCLUDE
    compute_dtype: str | None = None  # None: not recorded (e.g. a PEFT adapter); the loader picks
    chat_template: str | None = None
    chat_template_source: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CuraError(f"base record: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    @property
    def chat_template_sha256(self) -> str | None:
        return template_sha256(self.chat_template)

    @classmethod
    def from_config(
        cls,
        config,
        *,
        chat_template: str | None = None,
        chat_template_source: str | None = None,
        compute_dtype=None,
    ) -> BaseSpec:
        """The spec of a `TrainConfig` (read by attribute: model, method, quant_type, blocksize, double_quant,
        compute_dtype, and skip_modules where the config has it). `compute_dtype` is the dtype the run
        resolved ("auto" becomes what it picked); default: the config's own setting."""
        dtype = compute_dtype if compute_dtype is not None else config.compute_dtype
        return cls(
            source=normalize_source(config.model),
            method=config.method,
            quant_type=config.quant_type,
            blocksize=int(config.blocksize),
            double_quant=bool(config.double_quant),
            skip_modules=tuple(getattr(config, "skip_modules", DEFAULT_LORA_EXCLUDE)),
            compute_dtype=str(dtype).removeprefix("torch."),
            chat_template=chat_template,
            chat_template_source=chat_template_source,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["skip_modules"] = list(self.skip_modules)
        out["chat_template_sha256"] = self.chat_template_sha256
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "base record") -> BaseSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("source"), str):
            raise CuraError(f"{where}: the base record has no 'source'; re-save the adapter with cura train")
        spec = cls(**{k: v for k, v in data.items() if k in known})
        sha = data.get("chat_template_sha256")
        if sha and sha != spec.chat_template_sha256:
            raise CuraError(
                f"{where}: the chat template does not match its recorded sha256; the file was edited"
            )
        return spec

    def quant_text(self) -> str:
        """'NF4, blocksize 64, double quantization' (or 'full precision' for a LoRA base)."""
        if not self.quantized:
            return "full precision"
        dq = "double quantization" if self.double_quant else "no double quantization"
        return f"{self.quant_type.upper()}, blocksize {self.blocksize}, {dq}"

    def describe(self) -> str:
        return f"{self.source} ({self.quant_text()})"

    def same_base(self, other: BaseSpec) -> bool:
        """True when both describe the same base weights (compute dtype and template aside)."""
        quant = (self.quant_type, self.blocksize, self.double_quant) if self.quantized else None
        other_quant = (other.quant_type, other.blocksize, other.double_quant) if other.quantized else None
        return (self.source, self.method, quant, self.skip_modules) == (
            other.source,
            other.method,
            other_quant,
            other.skip_modules,
        )


def peft_base_path(source: str) -> str:
    """A `base_model_name_or_path` that PEFT / transformers can open with `from_pretrained`: the absolute
    path of the model folder, or for a GGUF source (the bundled model too) of its converted safetensors
    cache folder (converted now if it is not yet). The source as given when it cannot be resolved."""
    from cura.models.loading import hf_folder
    from cura.models.sources import resolve_source

    try:
        kind, path = resolve_source(source)
    except CuraError:
        return str(source)
    return str(Path(hf_folder(kind, path)).resolve())
