"""Merging an adapter into base weights: a pure state-dict transform, `W' = W + scale * B @ A`."""

from __future__ import annotations

import torch

from cura.adapters.config import LoraConfig
from cura.adapters.io import PREFIX, _module_weights
from cura.errors import CuraError


def merge_lora(
    base_state_dict: dict[str, torch.Tensor],
    adapter_state_dict: dict[str, torch.Tensor],
    config: LoraConfig,
) -> dict[str, torch.Tensor]:
    """A new state dict with every adapted weight replaced by `W + scale * (B @ A)` (inputs untouched).

    The sum is computed in float32 and cast back to W's dtype; scale = alpha / r (alpha / sqrt(r) with
    rsLoRA). Adapter keys are PEFT's (`base_model.model.<path>.lora_A.weight`, with or without an adapter
    name); the base weight is `<path>.weight`, or `<path>.base_layer.weight` in the state dict of a model
    that still has its LoRA wrappers, in which case the result uses the plain names and drops the LoRA keys.
    """
    pairs = _module_weights(adapter_state_dict, "adapter state dict")
    merged = dict(base_state_dict)
    for key in [k for k in merged if ".lora_A." in k or ".lora_B." in k]:
        del merged[key]
    for key in [k for k in merged if ".base_layer." in k]:
        merged[key.replace(".base_layer.", ".")] = merged.pop(key)
    scale = config.scaling
    for path, pair in pairs.items():
        key = f"{path}.weight"
        if key not in merged:
            raise CuraError(
                f"adapter key '{PREFIX}{path}.lora_A.weight' has no base weight '{key}' in the state dict; "
                "merge the adapter into the base model it was trained on"
            )
        weight, a, b = merged[key], pair["lora_A"].float(), pair["lora_B"].float()
        if not weight.is_floating_point():
            raise CuraError(
                f"base weight '{key}' is quantized ({weight.dtype}); dequantize the model first "
                "(cura.nn.linear4bit.dequantize_model) and merge into its full-precision state dict"
            )
        if a.shape[0] != config.r or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise CuraError(
                f"adapter weights for '{path}' have shapes A{tuple(a.shape)} B{tuple(b.shape)} that do not fit "
                f"'{key}' {tuple(weight.shape)} with lora.r={config.r}; use the adapter's own config"
            )
        merged[key] = (weight.float() + (b @ a) * scale).to(weight.dtype)
    return merged
