"""LoRA adapters: attach to a model, freeze the rest, save and load in the PEFT format, merge into weights.

config = LoraConfig(r=16, alpha=32)           # every linear but lm_head
attach_lora(model, config)                    # -> wrapped module paths; only LoRA weights train
save_adapter(model, config, "run/adapter", base=BaseSpec.from_config(train_config))
load_adapter(fresh_model, "run/adapter")      # also reads adapters written by PEFT
loaded = load_base_for_adapter("run/adapter") # exactly the recorded base, the adapter on it
merged = merge_lora(base.state_dict(), adapter_state_dict(model), config)
"""

from cura._lazy import lazy_getattr
from cura.adapters.config import LoraConfig

_LAZY = {
    **dict.fromkeys(
        ("attach_lora", "linear_layers", "lora_disabled", "lora_layers", "set_trainable", "unwrap_lora"),
        "cura.adapters.attach",
    ),
    **dict.fromkeys(
        ("adapter_state_dict", "load_adapter", "read_adapter_metadata", "save_adapter"),
        "cura.adapters.io",
    ),
    "merge_lora": "cura.adapters.merge",
    **dict.fromkeys(
        ("AdapterBase", "check_same_base", "load_base_for_adapter", "read_base_record"), "cura.adapters.base"
    ),
}
__getattr__ = lazy_getattr(__name__, _LAZY, globals())

__all__ = [
    "AdapterBase",
    "LoraConfig",
    "check_same_base",
    "load_base_for_adapter",
    "read_base_record",
    "adapter_state_dict",
    "attach_lora",
    "lora_disabled",
    "linear_layers",
    "load_adapter",
    "lora_layers",
    "merge_lora",
    "read_adapter_metadata",
    "save_adapter",
    "set_trainable",
    "unwrap_lora",
]
