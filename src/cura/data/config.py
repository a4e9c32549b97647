"""`DataConfig`: the one home of every data default, validated once in `__post_init__`."""

from __future__ import annotations

from dataclasses import dataclass, field

from cura.constants import DEFAULT_MAX_LENGTH
from cura.errors import CuraError

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "guanaco", "text")
OVERLONG = ("truncate", "drop", "error")


@dataclass
class DataConfig:
    """Where the data is and how it becomes token sequences.

    `fields` maps a canonical column to the file's column, e.g. `{"prompt": "dialogue", "completion":
    "summary"}`. `eval_split` is a fraction (0 < x < 1) or a row count (>= 1) held out of `path` when
    `eval_path` is None (default: 5%, so a run reports its held-out loss before and after; 0 for none). `overlong="truncate"` drops the oldest turns of the history first, then cuts the
    final answer; `drop` skips the sample; `error` stops. Every such sample is counted in the DataReport.
    """

    path: str | None = None
    """training data: .jsonl, .json, .csv, .parquet, a folder of them or a datasets save_to_disk folder"""
    eval_path: str | None = None
    """held-out data; none: eval_split of path is held out"""
    format: str = "auto"
    """auto (detected), alpaca, messages, sharegpt, prompt_completion, guanaco or text"""
    fields: dict[str, str] = field(default_factory=dict)
    """column mapping for custom data, e.g. prompt=question,completion=answer"""
    system_prompt: str | None = None
    """a system message added to every conversation that has none"""
    train_on_prompt: bool = False
    """also train on the prompt tokens, not only the answers"""
    max_length: int = DEFAULT_MAX_LENGTH
    """tokens per training sequence (the sequence length)"""
    overlong: str = "truncate"
    """a sample longer than max_length: truncate (oldest turns first), drop, or error"""
    packing: bool = True
    """pack several samples into one sequence (attention stays inside each sample)"""
    eval_split: float = 0.05
    """held out of path when there is no eval_path: a fraction below 1 or a row count"""
    seed: int = 0
    """seed of the split and the per-epoch order"""
    max_errors: int = 20
    """bad rows reported before the check stops"""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise CuraError(f"data.format is {self.format!r}; use one of {', '.join(FORMATS)}")
        if self.overlong not in OVERLONG:
            raise CuraError(f"data.overlong is {self.overlong!r}; use one of {', '.join(OVERLONG)}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise CuraError(f"data.max_length is {self.max_length!r}; use a whole number of tokens >= 2")
        if not isinstance(self.fields, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.fields.items()
        ):
            raise CuraError(
                f"data.fields is {self.fields!r}; use a mapping of column names, e.g. {{prompt: question}}"
            )
        split = self.eval_split
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0 <= split < float("inf"):
            raise CuraError(f"data.eval_split is {split!r}; use a fraction below 1 or a row count >= 1")
        if split >= 1 and float(split) != int(split):
            raise CuraError(f"data.eval_split is {split!r}; a count of rows must be a whole number")
        if not isinstance(self.max_errors, int) or self.max_errors < 1:
            raise CuraError(f"data.max_errors is {self.max_errors!r}; use a whole number >= 1")
        for key in ("path", "eval_path"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                setattr(self, key, str(value))
