"""`LoraConfig`: which linears get an adapter, with what rank and scale. The one home of the LoRA defaults."""

from __future__ import annotations

from dataclasses import dataclass

from cura.constants import ALL_LINEAR, DEFAULT_LORA_EXCLUDE
from cura.errors import CuraError

__all__ = ["ALL_LINEAR", "LoraConfig"]


@dataclass
class LoraConfig:
    """LoRA settings (QLoRA defaults: every linear but `lm_head`, dropout 0.05).

    `target_modules` is "all-linear" or module-name suffixes (`["q_proj", "v_proj"]`, or the string
    "q_proj,v_proj"); a module matches a name when its path equals it or ends in "." + name. `exclude` uses the
    same matching and wins over `target_modules`. Scale is alpha / r, or alpha / sqrt(r) with `use_rslora`.
    """

    r: int = 16
    """rank of the LoRA update"""
    alpha: float = 32.0
    """scale numerator: the update is multiplied by alpha / r"""
    dropout: float = 0.05
    """dropout on the LoRA input"""
    target_modules: str | list[str] = ALL_LINEAR
    """all-linear or module names (q_proj,v_proj) that get an adapter"""
    use_rslora: bool = False
    """scale by alpha / sqrt(r) (rank-stabilized LoRA)"""
    exclude: tuple[str, ...] = DEFAULT_LORA_EXCLUDE
    """module names that never get an adapter (wins over target_modules)"""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise CuraError(f"config key 'lora.r' must be a positive integer such as 16, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise CuraError(
                f"config key 'lora.alpha' must be a positive number such as 32, got {self.alpha!r}"
            )
        self.alpha = float(self.alpha)
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise CuraError(f"config key 'lora.dropout' must be a number from 0 to 1, got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise CuraError(f"config key 'lora.dropout' must be at least 0 and below 1, got {self.dropout!r}")
        self.dropout = float(self.dropout)
        self.target_modules = _normalize_targets(self.target_modules)
        if isinstance(self.exclude, str):
            self.exclude = tuple(n.strip() for n in self.exclude.split(",") if n.strip())
        if not all(isinstance(n, str) and n for n in self.exclude):
            raise CuraError(f"config key 'lora.exclude' must be a list of module names, got {self.exclude!r}")
        self.exclude = tuple(self.exclude)

    @property
    def scaling(self) -> float:
        from cura.nn.lora import lora_scale

        return lora_scale(self.r, self.alpha, self.use_rslora)


def _normalize_targets(value) -> str | list[str]:
    if isinstance(value, str):
        if value.strip() == ALL_LINEAR:
            return ALL_LINEAR
        value = [n.strip() for n in value.split(",") if n.strip()]
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(n, str) and n for n in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise CuraError(
        f"config key 'lora.target_modules' must be 'all-linear' or a list of module names such as "
        f"['q_proj', 'v_proj'], got {value!r}"
    )
