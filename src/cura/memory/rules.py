"""The rules of thumb people quote, shown beside the precise plan (labelled as rules of thumb).

Serving (inference) memory, from the parameter count P and the weights' bits Q:

    M = P * 4 bytes / (32 / Q) * 1.2          (the 1.2 covers KV cache and runtime overhead)

e.g. a 7B model: 16.8 GB at Q = 16, 8.4 GB at Q = 8, 4.2 GB at Q = 4. Full fine-tuning with AdamW in mixed
precision: about 4 bytes per parameter for the model plus about 20 for gradients, optimizer states and
activations, 24 bytes per parameter in all (168 GB for 7B). Both ignore sequence length, batch size, LoRA
and checkpointing, which is what the plan adds.
"""

from __future__ import annotations

from dataclasses import dataclass

SERVING_OVERHEAD = 1.2
FULL_FINETUNE_MODEL_BYTES = 4
FULL_FINETUNE_TRAINING_BYTES = 20


@dataclass(frozen=True)
class RuleOfThumb:
    name: str
    bytes: int
    formula: str


def serving_bytes(params: int, bits: int) -> int:
    """M = P * 4 / (32 / Q) * 1.2 bytes."""
    return int(params * 4 / (32 / bits) * SERVING_OVERHEAD)


def full_finetune_bytes(params: int) -> int:
    """(4 + 20) bytes per parameter."""
    return params * (FULL_FINETUNE_MODEL_BYTES + FULL_FINETUNE_TRAINING_BYTES)


def rules_of_thumb(params: int) -> list[RuleOfThumb]:
    """Serving at 16, 8 and 4 bits, and full fine-tuning, for a model of `params` parameters."""
    rules = [
        RuleOfThumb(f"serving, {q}-bit weights", serving_bytes(params, q), f"P * 4 B / (32 / {q}) * 1.2")
        for q in (16, 8, 4)
    ]
    rules.append(RuleOfThumb("full fine-tuning (AdamW)", full_finetune_bytes(params), "P * (4 + 20) B"))
    return rules
