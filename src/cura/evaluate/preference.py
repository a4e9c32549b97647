"""`cura eval --objective dpo|orpo|kto`: held-out preference metrics of a base and its adapter.

The base is the adapter's own model with the adapter switched off (`cura.adapters.lora_disabled`), so one
load scores both, and it is also the reference of the rewards (DPO/KTO), exactly as in training.
"""

from __future__ import annotations

from typing import Any

from cura.adapters import lora_disabled, lora_layers
from cura.data import DataConfig
from cura.data.preference import build_preference_datasets, preference_batches
from cura.errors import CuraError


def evaluate_preference_file(
    model,
    tokenizer,
    path: str,
    *,
    objective: str,
    preference=None,
    batch_size: int = 4,
    max_length: int = 1024,
    limit: int | None = None,
    fields: dict[str, str] | None = None,
    system_prompt: str | None = None,
    chunk_tokens: int = 1024,
) -> dict[str, Any]:
    """{"objective", "examples", "base": metrics, "adapter": metrics or None} on every row of `path`
    (metrics: `cura.train.preference.evaluate_preference`: loss, rewards/*, preference_accuracy, logp_margin)."""
    from cura.train.preference import evaluate_preference
    from cura.train.preference_config import PreferenceConfig

    config = DataConfig(
        path=path, eval_split=0, max_length=max_length, fields=fields or {}, system_prompt=system_prompt
    )
    data, _, _ = build_preference_datasets(
        config, tokenizer, paired=objective != "kto", batch_size=batch_size
    )
    if limit is not None:
        data.samples = data.samples[:limit]
    if not len(data):
        raise CuraError(f"no example of {path} is left to evaluate; raise --max-length or check --limit")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = preference_batches(
        data, batch_size=batch_size, max_length=max_length, seed=0, epoch=0, pad_token_id=pad, shuffle=False
    )
    device = next(model.parameters()).device
    options = dict(objective=objective, cfg=preference or PreferenceConfig())
    with lora_disabled(model):
        base = evaluate_preference(model, batches, device, chunk_tokens, **options)
    adapter = (
        evaluate_preference(model, batches, device, chunk_tokens, **options) if lora_layers(model) else None
    )
    return {"objective": objective, "examples": len(data), "base": base, "adapter": adapter}


def preference_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per metric, base and adapter columns."""
    base, adapter = result["base"], result["adapter"] or {}
    lines = [
        f"{result['objective']} on {result['examples']} held-out examples",
        "",
        "| metric | base | adapter |",
        "|---|---|---|",
    ]
    for key in base:
        a = adapter.get(key)
        lines.append(f"| {key} | {base[key]:.4f} | {'' if a is None else f'{a:.4f}'} |")
    return "\n".join(lines)
