"""Find the target linears, wrap them in `LoRALinear`, freeze the rest; and the way back (`unwrap_lora`).

A wrapped layer keeps its attribute name, so module paths become `...q_proj.base_layer` and
`...q_proj.lora_A`, exactly as in a PEFT model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from cura.adapters.config import ALL_LINEAR, LoraConfig
from cura.errors import CuraError
from cura.nn.lora import LoRALinear, SharedInputGroup
from cura.nn.select import select


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a module with integer in/out_features such as cura's (or bitsandbytes') Linear4bit."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(
        getattr(module, "out_features", None), int
    )


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear of the model by path, not looking inside existing LoRA wrappers."""
    found: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoRALinear):
            wrapped.append(path)
        elif path and is_linear(module):
            found[path] = module
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def _output_layer_path(model: nn.Module) -> str | None:
    """The path of the output projection (PEFT's all-linear skips it whatever its name)."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return None
    return next((p for p, m in model.named_modules() if m is out), None)


def select_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """The paths `config` puts an adapter on (in module order); CuraError naming a few linears if none."""
    linears = linear_layers(model)
    output = _output_layer_path(model) if config.target_modules == ALL_LINEAR else None
    chosen = select(linears, config.target_modules, config.exclude, output_layer=output)
    if not chosen:
        names = sorted({p.rsplit(".", 1)[-1] for p in linears})
        raise CuraError(
            f"config key 'lora.target_modules' ({config.target_modules!r}, excluding {list(config.exclude)}) "
            f"matched no linear layer of the model; its linear layers are named {', '.join(names[:8]) or 'nothing'}"
            f"{' ...' if len(names) > 8 else ''}, so pick some of those or use 'all-linear'"
        )
    return chosen


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def wrap_paths(model: nn.Module, paths: Iterable[str], config: LoraConfig) -> list[str]:
    """Wrap the linears at `paths` (no matching, no freezing): the primitive under attach and load."""
    done = []
    for path in paths:
        base = model.get_submodule(path)
        _set_module(model, path, LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora))
        done.append(path)
    group_shared_inputs(model, done)
    return done


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linears that read the same tensor in Llama-style blocks (attention's q/k/v, the MLP's gate/up)."""


def group_shared_inputs(model: nn.Module, paths: list[str]) -> int:
    """Make `cura.nn.lora.SharedInputGroup`s of the wrapped siblings in SHARED_INPUTS (same parent module)
    that have dropout; returns how many. A sibling that turns out to read another tensor still computes alone (the group
    matches its input by identity)."""
    wrapped = set(paths)
    count = 0
    for path in paths:
        parent, _, name = path.rpartition(".")
        for names in SHARED_INPUTS:
            if name != names[0]:
                continue
            siblings = [f"{parent}.{n}" if parent else n for n in names]
            members = [model.get_submodule(p) for p in siblings if p in wrapped]
            dropout = all(isinstance(m, LoRALinear) and getattr(m.lora_dropout, "p", 0) > 0 for m in members)
            if len(members) > 1 and dropout:  # without dropout each computes alone, exactly as PEFT's
                SharedInputGroup(members)
                count += 1
    return count


def set_trainable(model: nn.Module, trainable: bool = True) -> None:
    """Freeze every parameter; then the LoRA weights train if `trainable`."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable and (".lora_A." in f".{name}" or ".lora_B." in f".{name}"))


def attach_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Put a LoRA adapter on every target linear of `model` (in place); freeze all other parameters.

    Returns the wrapped module paths. A model that already has adapters is refused (use load_adapter).
    """
    if lora_layers(model):
        raise CuraError(
            "the model already has LoRA adapters; load weights into them with load_adapter, "
            "or call unwrap_lora first to start over"
        )
    targets = wrap_paths(model, select_targets(model, config), config)
    set_trainable(model, True)
    return targets


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by its base layer (in place; the adapter is dropped, not merged)."""
    for path, module in list(lora_layers(model).items()):
        _set_module(model, path, module.base_layer)
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its frozen base inside the block: every `LoRALinear` returns its base layer's output.

    This is the reference model of DPO and KTO (the policy at step 0, since B starts at zero) without a
    second copy of the weights; the previous state of each layer is restored on exit, even on an error.
    """
    layers = list(lora_layers(model).values())
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.enabled = state
