"""Layers: the frozen 4-bit linear (`Linear4bit`) and the LoRA wrapper (`LoRALinear`)."""

from cura.nn.linear4bit import Linear4bit, dequantize_model, linear_4bit, quantize_model
from cura.nn.lora import LoRALinear

__all__ = ["Linear4bit", "LoRALinear", "dequantize_model", "linear_4bit", "quantize_model"]
