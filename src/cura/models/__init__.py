"""Model loading from every source (HF folder, GGUF, bitsandbytes 4-bit folder, the bundled demo model)
with streaming 4-bit quantization, and saving in the transformers + bitsandbytes 4-bit format."""

from cura.models.base import BaseSpec
from cura.models.loading import LoadedModel, load_model, load_tokenizer, model_config
from cura.models.saving import save_quantized
from cura.models.sources import BUNDLED_NAME, KNOWN_NAMES, bundled_model_path, resolve_source

__all__ = [
    "BUNDLED_NAME",
    "BaseSpec",
    "KNOWN_NAMES",
    "LoadedModel",
    "bundled_model_path",
    "load_model",
    "load_tokenizer",
    "model_config",
    "resolve_source",
    "save_quantized",
]
