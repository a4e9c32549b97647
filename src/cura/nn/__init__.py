"""Layers: the frozen 4-bit linear (`Linear4bit`) and the LoRA wrapper (`LoRALinear`); the module selector.

Attributes are imported on first use, so `cura.nn.select` (torch-free) can be used without torch.
"""

from cura._lazy import lazy_getattr

_LAZY = {
    **dict.fromkeys(
        ("Linear4bit", "dequantize_model", "linear_4bit", "quantize_model"), "cura.nn.linear4bit"
    ),
    "LoRALinear": "cura.nn.lora",
}
__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = ["Linear4bit", "LoRALinear", "dequantize_model", "linear_4bit", "quantize_model"]
