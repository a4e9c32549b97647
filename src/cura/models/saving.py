"""Save a cura 4-bit model as a transformers + bitsandbytes checkpoint.

The folder is what `model.save_pretrained` writes for a model loaded with
`BitsAndBytesConfig(load_in_4bit=True, ...)`: config.json with a `quantization_config`
(quant_method "bitsandbytes"), `model.safetensors` with, per quantized weight W, the keys `W`, `W.absmax`,
`W.quant_map`, [`W.nested_absmax`, `W.nested_quant_map`], `W.quant_state.bitsandbytes__<type>`, plus the
tokenizer files. It loads with `AutoModelForCausalLM.from_pretrained(folder)` (bitsandbytes installed) and
with `cura.models.load_model(folder)` (kind "bnb", no bitsandbytes needed).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from cura.atomic import atomic_folder, check_replaceable, write_json
from cura.errors import CuraError


def quant_settings(state: dict[str, torch.Tensor]) -> tuple[str, bool]:
    """(quant_type, double_quant) read back from the bitsandbytes keys of a state dict."""
    types = {k.rpartition("__")[2] for k in state if ".quant_state.bitsandbytes__" in k}
    if len(types) != 1:
        raise CuraError(f"the model mixes 4-bit types {sorted(types)}: quantize every layer the same way")
    return types.pop(), any(k.endswith(".nested_absmax") for k in state)


def bnb_quantization_config(model, state: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> dict:
    """The `quantization_config` transformers writes for a bitsandbytes 4-bit model."""
    from transformers import BitsAndBytesConfig

    quant_type, double_quant = quant_settings(state)
    plain = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=plain,
    )
    out = config.to_dict()
    out["quant_method"] = "bitsandbytes"
    return out


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict without tied duplicates, every tensor contiguous and owning its storage."""
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    full = model.state_dict()
    state, seen = {}, set()
    for key, tensor in full.items():
        source = full.get(tied.get(key, ""))
        if source is not None and source.data_ptr() == tensor.data_ptr():
            continue  # transformers re-ties it on load
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in seen:  # e.g. a code table shared by many layers
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    return state


QUANT_RECORD = "cura_quantized.json"
"""Written into every folder `save_quantized` writes: marks it as cura's, so `overwrite=True` may replace it."""


def save_quantized(model, tokenizer, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` (with cura Linear4bit layers) and `tokenizer` to `folder`, atomically (see module doc).

    A non-empty `folder` is refused unless it is one this function wrote (its `QUANT_RECORD` lists every
    file in it) and `overwrite` is set; the new folder replaces it in one rename."""
    from safetensors.torch import save_file

    from cura.nn.linear4bit import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise CuraError(
            "save_quantized got a model without 4-bit layers: load it with `load_model(..., quantize=True)` "
            "or save a full-precision model with `model.save_pretrained`"
        )
    compute_dtype = getattr(layers[0], "compute_dtype", None) or model.get_input_embeddings().weight.dtype
    state = checkpoint_state(model)
    config = copy.deepcopy(model.config)
    config.quantization_config = bnb_quantization_config(model, state, compute_dtype)

    folder = Path(folder).absolute()
    check_replaceable(folder, marker=QUANT_RECORD, what="the 4-bit model", overwrite=overwrite, flag="folder")
    with atomic_folder(folder) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / QUANT_RECORD, {"format": 1, "files": sorted(p.name for p in tmp.iterdir())})
    return folder
