"""The one way tools get the base an adapter was trained on: `load_base_for_adapter`.

    adapter/cura_adapter.json "base"  ──BaseSpec──┐        (cura's record, written whole by training)
    adapter/adapter_config.json (PEFT only)  ─────┤ assumed: NF4, blocksize 64, double quantization, printed
                                                  ▼
    --model (optional) must name the recorded base; --no-quantize must agree with its method
                                                  ▼
    load_model(source, exactly the recorded quantization, skipped modules, compute dtype)
    + the adapter's chat template in the tokenizer (+ the adapter's weights, unless with_adapter=False)

generate, chat, eval, merge and export all come through here, so an adapter never meets a base other
than the one it was trained on without the user being told in one sentence.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cura.adapters.io import CONFIG_NAME, CURA_NAME, _read_json, read_adapter_metadata
from cura.constants import DEFAULT_QUANT_TYPE
from cura.errors import CuraError
from cura.models.base import BaseSpec, normalize_source


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class BaseRecord:
    """The base an adapter names. `incomplete` is None for cura's full record, else the file that lacks
    one (an older cura adapter's cura_adapter.json, or a PEFT adapter's adapter_config.json): then
    `spec` holds what that file says plus the QLoRA defaults, and `spec.source` may be "" (no base named)."""

    spec: BaseSpec
    incomplete: str | None = None
    peft_name: str | None = None  # adapter_config.json's base_model_name_or_path

    def assumption(self, spec: BaseSpec, asked: bool = False) -> str:
        what = "a full-precision base" if not spec.quantized else spec.quant_text()
        how = f"loading {what} as asked" if asked else f"assuming {what}"
        return f"{self.incomplete} does not record the base's quantization: {how}"


def read_base_record(adapter_dir: str | Path) -> BaseRecord:
    """The adapter's base record: cura's `base` entry, else (an older cura adapter, or one PEFT wrote) a
    spec built from what is there."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_metadata(adapter_dir)
    peft_name = _read_json(adapter_dir / CONFIG_NAME).get("base_model_name_or_path") or None
    if "base" in meta:
        return BaseRecord(BaseSpec.from_dict(meta["base"], str(adapter_dir / CURA_NAME)), None, peft_name)
    spec = BaseSpec(
        source=normalize_source(peft_name) if peft_name else "",
        method=meta.get("method", "qlora"),
        quant_type=meta.get("quant_type") or DEFAULT_QUANT_TYPE,
        chat_template=meta.get("chat_template"),
    )
    where = f"{adapter_dir / CURA_NAME}" if meta else f"{adapter_dir / CONFIG_NAME} (a PEFT adapter)"
    return BaseRecord(spec, where, peft_name)


@dataclass
class AdapterBase:
    """The base rebuilt for an adapter: model (eval mode), tokenizer, the spec used, and warnings."""

    model: Any
    tokenizer: Any
    spec: BaseSpec
    kind: str
    warnings: list[str] = field(default_factory=list)
    lora: Any = None  # the adapter's LoraConfig once loaded (with_adapter)


def resolve_base_spec(
    adapter_dir: str | Path, model: str | Path | None = None, *, quantize: bool | None = None, log=_stderr
) -> BaseSpec:
    """The spec to load for `adapter_dir`: its record, checked against `model` and `quantize` (the user's
    --model and --no-quantize); CuraError naming both when they disagree with the record."""
    record = read_base_record(adapter_dir)
    spec = record.spec
    if record.incomplete is None:  # cura's full record: anything the user passes must agree with it
        if model is not None and not _same_model(model, spec, record.peft_name):
            raise CuraError(
                f"the adapter in {adapter_dir} was trained on {spec.source} but --model names {model}; "
                f"leave out --model (or pass --model {spec.source}) to use the base it was trained on"
            )
        if quantize is not None and quantize != spec.quantized:
            asked = "a 4-bit base" if quantize else "a full-precision base (--no-quantize)"
            raise CuraError(
                f"the adapter in {adapter_dir} was trained on {spec.describe()} but {asked} was asked for; "
                "leave out the option to load the base it was trained on"
            )
        if model is None:
            log(f"base model: {spec.describe()} (from {Path(adapter_dir) / CURA_NAME})")
        return spec
    if model is not None:
        spec = replace(spec, source=normalize_source(model))
    elif spec.source:
        log(f"base model: {spec.source} (from {Path(adapter_dir) / CONFIG_NAME}; --model overrides it)")
    if not spec.source:
        raise CuraError(
            f"the adapter in {adapter_dir} does not name its base model ({CONFIG_NAME} has no "
            "base_model_name_or_path); pass --model with the model it was trained on"
        )
    if quantize is not None:
        spec = replace(spec, method="qlora" if quantize else "lora")
    log(f"note: {record.assumption(spec, asked=quantize is not None)}")
    return spec


def _same_model(model: str | Path, spec: BaseSpec, peft_name: str | None) -> bool:
    """True when `model` names the recorded base: its source (a known name counts as the file it stands
    for) or the folder adapter_config.json names for PEFT."""
    given = _identity(model)
    return given == _identity(spec.source) or (peft_name is not None and given == _identity(peft_name))


def _identity(source: str | Path) -> str:
    from cura.models.sources import resolve_source

    try:
        return str(resolve_source(source)[1].resolve())
    except CuraError:  # a source that is not there: compare the spelling
        return normalize_source(source)


def load_base_for_adapter(
    adapter_dir: str | Path,
    model: str | Path | None = None,
    *,
    quantize: bool | None = None,
    compute_dtype=None,
    device: str | None = None,
    with_adapter: bool = True,
    log=_stderr,
) -> AdapterBase:
    """Rebuild exactly the base `adapter_dir` was trained on (see the module docstring) and, with
    `with_adapter`, load the adapter onto it (frozen). `model` / `quantize` are the user's choices, checked
    against the record; `compute_dtype` (None or "auto": the recorded one, else the device's default)."""
    from cura.adapters.io import load_adapter
    from cura.export.template import check_template
    from cura.hardware import default_device, resolve_compute_dtype
    from cura.models import load_model

    spec = resolve_base_spec(adapter_dir, model, quantize=quantize, log=log)
    device = device or str(default_device())
    wanted = compute_dtype if compute_dtype not in (None, "auto") else (spec.compute_dtype or "auto")
    dtype = resolve_compute_dtype(wanted, device)
    loaded = load_model(
        spec.source,
        quantize=spec.quantized,
        quant_type=spec.quant_type,
        blocksize=spec.blocksize,
        double_quant=spec.double_quant,
        skip=spec.skip_modules,
        compute_dtype=dtype,
        device=device,
    )
    warnings = []
    warning = check_template(adapter_dir, loaded.tokenizer)
    if warning:
        warnings.append(warning)
        log(f"warning: {warning}")
    if spec.chat_template:
        loaded.tokenizer.chat_template = spec.chat_template
    lora = load_adapter(loaded.model, adapter_dir, trainable=False) if with_adapter else None
    loaded.model.eval()  # new LoRA wrappers start in training mode: no dropout at inference
    return AdapterBase(loaded.model, loaded.tokenizer, spec, loaded.kind, warnings, lora)


def check_same_base(
    adapter_dir: str | Path,
    spec: BaseSpec,
    *,
    spec_is: str = "loaded for the other adapter",
    advice: str = "compare adapters trained on the same base",
) -> None:
    """CuraError unless `adapter_dir` was trained on the base `spec` describes (e.g. adapter B of an
    eval comparison, loaded onto the base of adapter A; a checkpoint resumed by a run). `spec_is` and
    `advice` finish the sentence: "... not on the <spec> <spec_is>; <advice>". An adapter without cura's
    record passes (there is nothing to compare)."""
    other = read_base_record(adapter_dir)
    if other.incomplete is None and not other.spec.same_base(spec):
        raise CuraError(
            f"the adapter in {adapter_dir} was trained on {other.spec.describe()}, not on the "
            f"{spec.describe()} {spec_is}; {advice}"
        )
