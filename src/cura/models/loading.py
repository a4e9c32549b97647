"""Load a causal LM from any source, quantizing each linear layer to 4 bits as its weight is read.

Lean loading (peak memory ~ the quantized model plus one full-precision weight):

    config.json ──> model skeleton on the meta device (no memory)
                    non-persistent buffers (rotary inv_freq, embed scales) materialised and initialised
                    by the model's own `_init_weights` on the real device
    safetensors ──> for each target linear: read W (one tensor) -> quantize (NF4 + DQ) -> Linear4bit
                    for every other tensor: read -> cast to compute_dtype -> assign into the skeleton
                    tied weights (lm_head <- embed_tokens) re-tied; nothing may stay on meta

A prequantized bitsandbytes checkpoint ("bnb") takes the same path, building each Linear4bit from its
stored 4-bit state instead of quantizing.

With `on_layer` (`--fsdp`: `cura.train.fsdp.LayerSharder`) the decoder layers are loaded one after another,
each whole (its linears, then its norms), and `on_layer(model, path, layer)` runs on it before the next one
is read: there it is sharded, so its whole 4-bit tensors are freed before the next layer loads. The rest
(embeddings, final norm, output layer) is loaded after the layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cura.constants import DEFAULT_BLOCKSIZE, DEFAULT_DOUBLE_QUANT, DEFAULT_LORA_EXCLUDE, DEFAULT_QUANT_TYPE
from cura.errors import CuraError
from cura.memory.gguf_meta import read_gguf_metadata
from cura.models.checkpoint import CheckpointReader
from cura.models.gguf import cached_gguf_folder, gguf_args, gguf_to_hf_folder
from cura.models.sources import BUNDLED_NAME, resolve_source
from cura.nn.select import matches

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BNB_STATE_SUFFIXES = ("bitsandbytes__nf4", "bitsandbytes__fp4")


@dataclass
class LoadedModel:
    """A loaded model: a transformers `*ForCausalLM` in eval mode, its tokenizer, and where it came from.

    `kind` is "hf", "gguf", "bnb" or "bundled" (see `cura.models.sources.resolve_source`)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    kind: str


def hf_folder(kind: str, path: Path) -> Path:
    """The transformers folder to read for a resolved source (GGUF sources are converted once and cached)."""
    if kind in ("gguf", "bundled"):
        return gguf_to_hf_folder(path, BUNDLED_NAME if kind == "bundled" else None)
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_auto_config(folder: Path, *, trust_remote_code: bool = False):
    """transformers' config of a model folder, with one sentence when config.json cannot be one.

    Note (why a broad except): transformers validates a config in the model family's own code, so an
    unknown model_type, `num_attention_heads: 0` or heads that do not divide `hidden_size` raise ValueError,
    ZeroDivisionError or huggingface_hub's StrictDataclassClassValidationError, whichever check comes
    first. All of them mean the same thing to the user: this config.json does not describe a model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CuraError(
            f"{folder / 'config.json'} does not describe a model transformers can build ({type(exc).__name__}: "
            f"{reason}); restore config.json from the model's source"
        ) from None


def tokenizer_from_folder(folder: Path, *, trust_remote_code: bool = False):
    """AutoTokenizer for a model folder, with a CuraError when the folder has no tokenizer files (its
    config.json is checked first: the tokenizer loader reads it too, see `load_auto_config`)."""
    from transformers import AutoTokenizer

    load_auto_config(folder, trust_remote_code=trust_remote_code)

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CuraError(
            f"model folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the base "
            "model's tokenizer into it with `tokenizer.save_pretrained(folder)`"
        )
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_tokenizer(source: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer (with its chat template) of a model source, without loading the weights (a GGUF source
    is converted to its cache folder on first use, so the model load that usually follows is fast)."""
    kind, path = resolve_source(source)
    return tokenizer_from_folder(hf_folder(kind, path), trust_remote_code=trust_remote_code)


def model_config(source: str | Path, *, trust_remote_code: bool = False):
    """The transformers config of a model source, without reading any weights (for the memory planner)."""
    from transformers import AutoConfig

    kind, path = resolve_source(source)
    if kind in ("gguf", "bundled"):
        folder = cached_gguf_folder(path, BUNDLED_NAME if kind == "bundled" else None)
        if folder is None:  # read the GGUF's metadata only; no conversion
            read_gguf_metadata(path)  # a damaged header: one sentence before transformers reads it
            folder, file = gguf_args(path)
            return AutoConfig.from_pretrained(folder, gguf_file=file)
        path = folder
    return load_auto_config(path, trust_remote_code=trust_remote_code)


def load_model(
    source: str | Path,
    *,
    quantize: bool = True,
    quant_type: str = DEFAULT_QUANT_TYPE,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = DEFAULT_DOUBLE_QUANT,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = DEFAULT_LORA_EXCLUDE,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `source` (HF folder | .gguf | bnb-4bit folder | "smollm2-135m") as a `*ForCausalLM` in eval mode.

    With `quantize=True` every `nn.Linear` whose name does not match `skip` (`cura.nn.select.matches`, the
    rule `quantize_model` and PEFT use) becomes a cura `Linear4bit`
    (`quant_type` codes, `blocksize` elements per absmax, double quantization of the absmax); embeddings,
    norms and skipped linears stay in `compute_dtype`. With `quantize=False` the model is exactly what
    transformers loads in `compute_dtype` (a bnb checkpoint is dequantized). A bnb checkpoint keeps the 4-bit
    settings it was saved with; `quant_type`, `blocksize` and `double_quant` apply to layers quantized here."""
    kind, path = resolve_source(source)
    folder = hf_folder(kind, path)
    tokenizer = tokenizer_from_folder(folder, trust_remote_code=trust_remote_code)
    spec = QuantSpec(quant_type, blocksize, double_quant) if quantize else None
    model = load_checkpoint(
        folder,
        spec,
        compute_dtype=compute_dtype,
        skip=skip,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source), kind=kind)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize the target linears of a model being loaded."""

    quant_type: str = DEFAULT_QUANT_TYPE
    blocksize: int = DEFAULT_BLOCKSIZE
    double_quant: bool = DEFAULT_DOUBLE_QUANT


def load_checkpoint(
    folder: Path,
    spec: QuantSpec | None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    skip: tuple[str, ...] = DEFAULT_LORA_EXCLUDE,
    device: str = "cpu",
    trust_remote_code: bool = False,
    on_layer: Callable[[nn.Module, str, nn.Module], None] | None = None,
):
    """Build the model of a transformers folder on meta, then stream its tensors in (see module docstring;
    `on_layer` is called on each decoder layer as soon as it is loaded)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = load_auto_config(folder, trust_remote_code=trust_remote_code)
    try:
        if hasattr(config, "quantization_config"):  # a bnb folder: the 4-bit state is read from the tensors
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=compute_dtype, trust_remote_code=trust_remote_code
            )
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, ZeroDivisionError) as exc:
        # transformers builds the model from config.json alone: an unknown model_type, a size of 0 or -5,
        # heads that do not divide the width surface here as whichever error the model's code hits first
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CuraError(
            f"{folder / 'config.json'} does not describe a model transformers can build ({type(exc).__name__}: "
            f"{reason}); restore config.json from the model's source"
        ) from None
    device = torch.device(device)
    init_non_persistent_buffers(model, device)
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    with CheckpointReader(folder) as ckpt:
        check_weights_match_config(model, ckpt, folder)
        replaced: set[str] = set()
        done: list[str] = []
        for path in decoder_layer_paths(model) if on_layer is not None else ():
            replaced |= load_linears(model, ckpt, tied, spec, skip, compute_dtype, device, within=path)
            load_other_tensors(model, ckpt, tied, replaced, device, within=path)
            on_layer(model, path, model.get_submodule(path))
            done.append(path)
        replaced |= load_linears(model, ckpt, tied, spec, skip, compute_dtype, device, exclude=done)
        load_other_tensors(model, ckpt, tied, replaced, device, exclude=done)
    retie(model, tied, replaced)
    # (named tensors rather than state_dict(): a layer sharded by `on_layer` holds DTensor shards)
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    left = [k for k, t in named if t.is_meta]
    if left:
        raise CuraError(
            f"checkpoint {folder} is missing {len(left)} tensors (first: {left[0]}): re-save the model"
        )
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def check_weights_match_config(model, ckpt, folder: Path) -> None:
    """config.json against the stored tensors, before any is read: every tensor the model has must have the
    stored shape (a `hidden_size` wider than the weights), and the weights may not hold more layers than
    `num_hidden_layers` (the extra layers would be left out of training without a word)."""
    config = model.config
    # the stacks of the skeleton ("model.layers."), so that other stored stacks (a vision tower) do not count
    stacks = {key[: m.start(1)] for key, _ in model_tensors(model, set()) if (m := _LAYER_INDEX.search(key))}
    layers = {
        int(m.group(1))
        for key in ckpt.keys()
        if (m := _LAYER_INDEX.search(key)) and key[: m.start(1)] in stacks
    }
    wanted = getattr(config, "num_hidden_layers", None)
    if layers and isinstance(wanted, int) and max(layers) + 1 > wanted:
        raise CuraError(
            f"{folder / 'config.json'} says num_hidden_layers {wanted} but the weights hold {max(layers) + 1} "
            f"layers: cura would silently leave layers {wanted}..{max(layers)} out; set num_hidden_layers "
            f"to {max(layers) + 1} or restore config.json from the model's source"
        )
    packed = {k.split(".quant_state.")[0] for k in ckpt.keys() if ".quant_state." in k}
    for key, tensor in model_tensors(model, set()):
        entry = ckpt.entries.get(key)
        if entry is None or key in packed or key.rpartition(".")[0] in packed:
            continue
        if tuple(entry.shape) != tuple(tensor.shape):
            raise CuraError(
                f"{folder / 'config.json'} does not match the weights: '{key}' is stored as "
                f"{tuple(entry.shape)} but the config makes it {tuple(tensor.shape)} (hidden_size "
                f"{getattr(config, 'hidden_size', '?')}, intermediate_size {getattr(config, 'intermediate_size', '?')}); "
                "restore config.json from the model's source"
            )


def decoder_layer_paths(model) -> list[str]:
    """The module paths of the decoder's repeated layers (`model.layers.0`, ...), in order."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not len(layers):
        raise CuraError(
            f"--fsdp found no decoder layers in {type(model).__name__} (no `.layers` on its decoder); train "
            "it without --fsdp"
        )
    stack = next(path for path, module in model.named_modules() if module is layers)
    return [f"{stack}.{i}" for i in range(len(layers))]


def in_scope(name: str, within: str | None = None, exclude: Sequence[str] = ()) -> bool:
    """`name` is `within` or under it (any name when None), and under none of `exclude`."""

    def under(prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    return (within is None or under(within)) and not any(under(p) for p in exclude)


def load_linears(
    model,
    ckpt,
    tied,
    spec,
    skip,
    compute_dtype,
    device,
    within: str | None = None,
    exclude: Sequence[str] = (),
) -> set[str]:
    """Replace each linear that is stored in 4 bits, or is a quantization target, by a Linear4bit (or a
    dequantized nn.Linear for a bnb layer with `spec=None`); returns the replaced module names. Only the
    linears in scope (`in_scope(name, within, exclude)`) are read."""
    replaced = set()
    linears = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and in_scope(name, within, exclude)
    ]
    for name in linears:
        layer = read_linear(ckpt, name, model.get_submodule(name), tied, spec, skip, compute_dtype, device)
        if layer is not None:
            model.set_submodule(name, layer)
            replaced.add(name)
    return replaced


def load_other_tensors(
    model, ckpt, tied, replaced: set[str], device, within: str | None = None, exclude: Sequence[str] = ()
) -> None:
    """Read every remaining parameter and persistent buffer (in scope: `in_scope`) into the skeleton, in
    the skeleton's dtype."""
    for key, tensor in model_tensors(model, replaced):
        if not in_scope(key, within, exclude):
            continue
        if key in tied and (key not in ckpt or tied[key] in ckpt):
            continue  # re-tied after its source is loaded, as transformers does
        if key not in ckpt:
            raise CuraError(
                f"checkpoint {ckpt.folder} has no tensor '{key}' that {type(model).__name__} needs: the "
                "weights do not match config.json; re-save the model or fix the config"
            )
        set_tensor(model, key, cast(ckpt.get(key), tensor.dtype, device))


def retie(model, tied: dict[str, str], replaced: set[str]) -> None:
    """Point each tied parameter (e.g. `lm_head.weight`) at its loaded source parameter."""
    for target, src in tied.items():
        if target.rpartition(".")[0] in replaced:
            continue  # a quantized lm_head holds its own 4-bit copy
        if target_param_is_meta(model, target):
            set_tensor(model, target, model.get_parameter(src), keep_object=True)


def init_non_persistent_buffers(model, device: torch.device) -> None:
    """Materialise buffers that checkpoints never hold (rotary `inv_freq`, embedding scales) on `device`
    and fill them with the model's own initialisation, as transformers does after loading."""
    owners = {}
    for key, buffer in list(model.named_buffers()):
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._non_persistent_buffers_set:
            module._buffers[attr] = torch.empty_like(buffer, device=device)
            owners[module_name] = module
    with torch.no_grad():
        for module in owners.values():
            model._init_weights(module)


def model_tensors(model, replaced: set[str]):
    """(key, tensor) for every parameter and persistent buffer outside the replaced (4-bit) modules,
    tied duplicates included."""
    for module_name, module in model.named_modules(remove_duplicate=False):
        if any(module_name == r or module_name.startswith(r + ".") for r in replaced):
            continue
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                yield prefix + attr, param
        for attr, buffer in module._buffers.items():
            if buffer is not None and attr not in module._non_persistent_buffers_set:
                yield prefix + attr, buffer


def target_param_is_meta(model, key: str) -> bool:
    module_name, _, attr = key.rpartition(".")
    tensor = getattr(model.get_submodule(module_name), attr, None)
    return tensor is None or tensor.is_meta


def set_tensor(model, key: str, tensor: torch.Tensor, *, keep_object: bool = False) -> None:
    """Put `tensor` into the model at `key` (parameter or buffer), replacing the meta placeholder."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        if keep_object and isinstance(tensor, nn.Parameter):
            module._parameters[attr] = tensor
        else:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = tensor


def cast(tensor: torch.Tensor, model_dtype: torch.dtype, device) -> torch.Tensor:
    """Floating tensors take the skeleton's dtype (compute_dtype, or float32 where a model keeps it)."""
    dtype = model_dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=dtype)


def read_linear(ckpt, name, meta_layer, tied, spec, skip, compute_dtype, device):
    """A Linear4bit for `name` (read from its bnb state or quantized from its weight), an nn.Linear when a
    bnb layer must be dequantized, or None when the layer is loaded as a plain tensor later."""
    wkey = f"{name}.weight"
    bias = None
    if f"{name}.bias" in ckpt:
        bias = ckpt.get(f"{name}.bias").to(device=device, dtype=compute_dtype)
    state_key = next(
        (f"{wkey}.quant_state.{s}" for s in BNB_STATE_SUFFIXES if f"{wkey}.quant_state.{s}" in ckpt), None
    )
    if state_key is not None:
        qweight = read_bnb_weight(ckpt, wkey, device)
        if spec is None:
            linear = nn.Linear(
                meta_layer.in_features, meta_layer.out_features, bias=bias is not None, device="meta"
            )
            linear.weight = nn.Parameter(qweight.dequantize(compute_dtype))
            if bias is not None:
                linear.bias = nn.Parameter(bias)
            return linear
        from cura.nn.linear4bit import Linear4bit

        return Linear4bit(qweight, bias=bias, compute_dtype=compute_dtype)
    if spec is None or matches(name, skip):
        return None
    if wkey not in ckpt and wkey in tied and tied[wkey] in ckpt:
        wkey = tied[wkey]  # a quantized lm_head tied to the embedding
    if wkey not in ckpt:
        return None  # reported as a missing tensor by the caller
    from cura.nn.linear4bit import Linear4bit

    weight = ckpt.get(wkey, scratch=True).to(device)  # dropped once quantized
    return Linear4bit(quantize_weight(weight, spec), bias=bias, compute_dtype=compute_dtype)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec):
    from cura.quant import quantize

    return quantize(
        weight, quant_type=spec.quant_type, blocksize=spec.blocksize, double_quant=spec.double_quant
    )


def read_bnb_weight(ckpt, wkey: str, device):
    """A QuantizedTensor from the bitsandbytes keys of one weight (`W`, `W.absmax`, `W.quant_map`, ...)."""
    from cura.quant import QuantizedTensor

    state = {k: ckpt.get(k).to(device) for k in ckpt.keys() if k == wkey or k.startswith(wkey + ".")}
    try:
        return QuantizedTensor.from_bnb_state_dict(state, wkey)
    except ValueError as e:
        raise CuraError(f"checkpoint {ckpt.folder}: {e}") from e
