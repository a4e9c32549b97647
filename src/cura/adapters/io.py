"""Adapters on disk in the PEFT layout, so `peft.PeftModel.from_pretrained` (and vLLM, llama.cpp's converter)
read what cura writes, and cura reads what PEFT writes.

    folder/
      adapter_config.json          PEFT's LoraConfig: peft_type LORA, r, lora_alpha, target_modules (the exact
                                   module paths), use_rslora, ...
      adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r, in)
                                   base_model.model.<module path>.lora_B.weight  (out, r)
      cura_adapter.json            cura's record: the LoRA config as given, `base` (the whole BaseSpec of the
                                   base it was trained on, cura.models.base), the chat template, `extra`
                                   (a separate file because PEFT warns about unknown keys in its config)

`base_model_name_or_path` is a path PEFT / transformers can open (for a GGUF source, the converted folder);
cura's own name for the base is `base.source` in cura_adapter.json.

Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from cura.adapters.attach import is_linear, lora_layers, set_trainable, wrap_paths
from cura.adapters.config import LoraConfig
from cura.atomic import atomic_file, atomic_folder, write_json
from cura.constants import ALL_LINEAR
from cura.errors import CuraError
from cura.inputs import read_json_file
from cura.models.base import BaseSpec, peft_base_path
from cura.safetensors_check import load_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CURA_NAME = "cura_adapter.json"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under PEFT's keys: `base_model.model.<module path>.lora_A.weight` (and lora_B)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        out[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def peft_config_dict(config: LoraConfig, targets: list[str], base_model_name_or_path: str) -> dict[str, Any]:
    """The `adapter_config.json` PEFT 0.21 loads (its defaults spelled out for every field that matters)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _write_files(folder: Path, weights: dict, files: dict[str, Any]) -> None:
    """Each file of the adapter written atomically into `folder` (`cura.atomic`)."""
    with atomic_file(folder / WEIGHTS_NAME) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    for name, data in files.items():
        write_json(folder / name, data)


def save_adapter(
    model: nn.Module,
    config: LoraConfig,
    folder: str | Path,
    *,
    base: BaseSpec | None = None,
    base_model_name_or_path: str | None = None,
    chat_template: str | None = None,
    extra: dict | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's adapter to `folder` in the PEFT layout plus `cura_adapter.json`; returns the folder.

    `base` (what training writes) is recorded whole; `base_model_name_or_path` and `chat_template` default to
    the path PEFT can open for it (`peft_base_path`) and its template. Without `base` the adapter records no
    base and tools assume one (as for an adapter PEFT wrote).

    A new folder is filled under a temporary name and renamed into place; in an existing folder of cura's
    (empty, or holding cura_adapter.json) each file is replaced atomically and other files there are left
    alone; a folder holding files cura did not write is refused (CuraError). `weights`: the adapter's
    tensors when the model's own are shards (`cura.train.fsdp.full_adapter` gathers them).
    """
    if weights is None:
        weights = {k: v.to("cpu", copy=True).contiguous() for k, v in adapter_state_dict(model).items()}
    if not weights:
        raise CuraError("the model has no LoRA adapters to save; call attach_lora(model, config) first")
    layers = lora_layers(model)
    odd = next((p for p, m in layers.items() if (m.r, m.scaling) != (config.r, config.scaling)), None)
    if odd is not None:
        raise CuraError(
            f"the adapter on '{odd}' has r={layers[odd].r}, scale {layers[odd].scaling:g} but the config says "
            f"lora.r={config.r}, scale {config.scaling:g}; save with the config the adapters were attached with"
        )
    if base is not None:
        base_model_name_or_path = base_model_name_or_path or peft_base_path(base.source)
    if not base_model_name_or_path:
        raise CuraError("save_adapter needs the base: pass base=BaseSpec(...) or base_model_name_or_path")
    files = {
        CONFIG_NAME: peft_config_dict(config, sorted(layers), base_model_name_or_path),
        CURA_NAME: cura_record(config, base, chat_template, extra),
    }
    folder = Path(folder)
    if folder.exists():
        _check_ours(folder)
        _write_files(folder, weights, files)
    else:
        with atomic_folder(folder, overwrite=False) as tmp:
            _write_files(tmp, weights, files)
    return folder


def _check_ours(folder: Path) -> None:
    """Refuse (one sentence) to write into an existing folder that is a file or holds files but no
    cura_adapter.json: its adapter_config.json or weights are someone else's (a PEFT adapter, the user's
    files), and saving would replace them."""
    if not folder.is_dir():
        raise CuraError(f"cannot save the adapter to {folder}: it is a file; give a folder")
    if any(folder.iterdir()) and not (folder / CURA_NAME).is_file():
        raise CuraError(
            f"cannot save the adapter to {folder}: it holds files cura did not write (no {CURA_NAME}); "
            "pick a new or empty folder"
        )


def cura_record(config: LoraConfig, base: BaseSpec | None, chat_template: str | None, extra) -> dict:
    """The content of cura_adapter.json: the LoRA config as given, the chat template (the base record's
    unless given), `extra`, and the whole base record."""
    if base is not None and chat_template is None:
        chat_template = base.chat_template
    record = {
        "format": 1,
        "lora": {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)},
        "chat_template": chat_template,
        **(extra or {}),
    }
    if base is not None:
        record["base"] = base.to_dict()
    return record


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _read_json(path: Path) -> dict:
    """A JSON object of the adapter folder; one sentence for bad JSON, bytes that are not UTF-8, depth."""
    return read_json_file(path, "rewrite or delete the file (this is not a valid adapter config)")


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise CuraError(f"adapter folder {folder} does not exist; pass the folder holding {CONFIG_NAME}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise CuraError(
                f"{folder} has no {name}; pass a folder written by cura or by PEFT's save_pretrained"
            )


def read_adapter_metadata(folder: str | Path) -> dict:
    """cura's extras saved with the adapter (`chat_template`, `lora`, `extra` keys); {} for a PEFT adapter."""
    folder = Path(folder)
    _check_folder(folder)
    path = folder / CURA_NAME
    return _read_json(path) if path.is_file() else {}


def config_from_peft(data: dict, where: Path) -> LoraConfig:
    """A `LoraConfig` from PEFT's `adapter_config.json` fields; CuraError for LoRA variants cura lacks."""
    if data.get("peft_type", "LORA") != "LORA":
        raise CuraError(f"{where}: peft_type is {data.get('peft_type')!r}; cura loads only LORA adapters")
    unsupported = {
        "use_dora": bool(data.get("use_dora")),
        "fan_in_fan_out": bool(data.get("fan_in_fan_out")),
        "bias": data.get("bias", "none") != "none",
        "modules_to_save": bool(data.get("modules_to_save")),
        "rank_pattern": bool(data.get("rank_pattern")),
        "alpha_pattern": bool(data.get("alpha_pattern")),
    }
    for key, bad in unsupported.items():
        if bad:
            raise CuraError(
                f"{where}: '{key}' is {data.get(key)!r}, which cura does not support; merge this adapter with "
                "PEFT (merge_and_unload) or retrain it without that option"
            )
    targets = data.get("target_modules") or ALL_LINEAR
    if isinstance(targets, str) and targets != ALL_LINEAR:
        targets = [targets]
    try:
        return LoraConfig(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout") or 0.0),
            target_modules=targets,
            use_rslora=bool(data.get("use_rslora", False)),
            exclude=(),
        )
    except KeyError:
        raise CuraError(f"{where}: the LoRA rank 'r' is missing; this is not a LoRA adapter config") from None


def _module_weights(weights: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A": A, "lora_B": B}} from PEFT keys (with or without the adapter name)."""
    by_path: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        match = _KEY.match(key[len(PREFIX) :] if key.startswith(PREFIX) else key)
        if match is None:
            raise CuraError(
                f"{where}: tensor '{key}' is not a LoRA weight (expected <module>.lora_A.weight or "
                ".lora_B.weight); cura loads plain LoRA adapters only"
            )
        by_path.setdefault(match["path"], {})[match["which"]] = value
    for path, pair in by_path.items():
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise CuraError(
                f"{where}: module '{path}' has no {missing}.weight; the adapter file is incomplete"
            )
    return by_path


def load_adapter(model: nn.Module, folder: str | Path, *, trainable: bool = False) -> LoraConfig:
    """Load an adapter written by cura or PEFT into `model` (in place); returns its LoraConfig.

    Adapters are attached first where the model has none (at exactly the modules the file names); a model
    that already has adapters must have them at the same modules with the same shapes. Everything but the LoRA
    weights is frozen; those train only if `trainable`.
    """
    folder = Path(folder)
    _check_folder(folder)
    config = config_from_peft(_read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    cura_lora = read_adapter_metadata(folder).get("lora")
    if cura_lora:  # cura's own record keeps 'all-linear' and `exclude` as the user wrote them
        known = {f.name for f in dataclasses.fields(LoraConfig)}
        config = LoraConfig(**{k: v for k, v in cura_lora.items() if k in known})
    where = folder / WEIGHTS_NAME
    weights = _module_weights(load_safetensors(where), where)  # its header checked against the file
    existing = lora_layers(model)
    stray = sorted(set(existing) - set(weights))
    if stray:
        raise CuraError(
            f"{where} has no weights for the model's adapter on '{stray[0]}'; load it into a model without "
            "adapters (or one with the same LoRA targets)"
        )
    for path, pair in weights.items():  # check everything before changing anything
        module = existing.get(path) or _get(model, path)
        if module is None or not (path in existing or is_linear(module)):
            raise CuraError(
                f"{where}: key '{PREFIX}{path}.lora_A.weight' names module '{path}', which is not a "
                f"{'LoRA layer' if existing else 'linear layer'} of this model; load the adapter into the base "
                "model it was trained on" + (" (with the same LoRA targets)" if existing else "")
            )
        r = module.r if path in existing else config.r
        for which, shape in (("lora_A", (r, module.in_features)), ("lora_B", (module.out_features, r))):
            if tuple(pair[which].shape) != shape:
                raise CuraError(
                    f"{where}: '{PREFIX}{path}.{which}.weight' has shape {tuple(pair[which].shape)} but module "
                    f"'{path}' needs {shape}; the adapter was trained on another model or with another rank"
                )
    if not existing:
        wrap_paths(model, sorted(weights), config)
    layers = lora_layers(model)
    with torch.no_grad():
        for path, pair in weights.items():
            layer = layers[path]
            for which, tensor in pair.items():
                _copy_into(getattr(layer, which).weight, tensor)
            layer.alpha, layer.use_rslora, layer.scaling = config.alpha, config.use_rslora, config.scaling
    set_trainable(model, trainable)
    return config


def _copy_into(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """param <- tensor; for a parameter sharded across processes (a DTensor, `cura.train.fsdp`) only this
    rank's rows of the whole `tensor` (every rank reads the same file, so no communication is needed)."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        param.copy_(tensor)
        return
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(tensor.to(param.dtype), mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(mine.to_local())


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
