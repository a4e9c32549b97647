"""Export a LoRA adapter alone as a llama.cpp LoRA adapter GGUF (`cura export gguf --adapter RUN/adapter
--lora-only`), the file llama.cpp's `convert_lora_to_gguf.py` writes and `llama-server --lora` / Ollama's
`ADAPTER` load on top of the base model's GGUF:

    metadata   general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (float32),
               general.architecture = the base's (llama | qwen2), general.file_type
    tensors    per adapted linear layer, the base weight's GGUF name + ".lora_a" / ".lora_b":
               blk.N.attn_q.weight.lora_a   A (r, in) as numpy shape, GGML ne = [in, r]
               blk.N.attn_q.weight.lora_b   B (out, r) as numpy shape, GGML ne = [r, out]

llama.cpp (llama-adapter.cpp) checks `a.ne[0] == W.ne[0]`, `b.ne[1] == W.ne[1]`, `a.ne[1] == b.ne[0]` and
computes `W x + scale * alpha / rank * B (A x)` (rank = a.ne[1]). cura's scale (alpha / r, or alpha /
sqrt(r) with rsLoRA) is therefore written as `adapter.lora.alpha = scale * r`, which is the plain alpha for
an ordinary LoRA. For a Llama-family base the q/k rows of the base are permuted for GGML's rope
(`permute_qk`); `B A` must be permuted the same way, which is a row permutation of B alone (A is shared by
every row), as convert_lora_to_gguf.py does through its LoraTorchTensor.

The check reads the file back with gguf-py and compares every tensor with the adapter (names, shapes, row
order undone). With `verify` (default: when xllamacpp is installed), the base as trained (dequantized, in
float32) is written to a temporary GGUF, llama.cpp loads it with the adapter file applied, and its chat
prompt, greedy answers and log-probabilities are compared with transformers on base + adapter merged.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from cura.atomic import atomic_file, write_json, write_text
from cura.errors import CuraError

LORA_TYPES = ("f32", "f16")  # a B row is r values long: q8_0 blocks (32) rarely fit it
READ_BACK_TOLERANCE = {"f32": 0.0, "f16": 1e-3}  # relative to each tensor's largest value


def lora_tensors(weights: dict[str, torch.Tensor], config, arch: str, permute: bool):
    """(GGUF name, float32 numpy array) of every LoRA tensor, in llama.cpp's names and row order.

    `weights` has PEFT's keys (`base_model.model.<module path>.lora_A.weight`)."""
    import gguf

    from cura.adapters.io import _module_weights
    from cura.export.gguf import _qk_heads, permute_qk

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    out = []
    for path, pair in sorted(_module_weights(weights, Path("the adapter")).items()):
        key = f"{path}.weight"
        name = names.get_name(key, try_suffixes=(".weight",))
        if name is None or (path.endswith("lm_head") and getattr(config, "tie_word_embeddings", False)):
            raise CuraError(
                f"the adapter adapts '{path}', which has no tensor of its own in a {arch} GGUF; export the "
                "adapter merged instead (cura export gguf --adapter ... without --lora-only)"
            )
        a = pair["lora_A"].detach().to(torch.float32)
        b = pair["lora_B"].detach().to(torch.float32)
        heads = _qk_heads(key, config) if permute else None
        if heads is not None:
            b = permute_qk(b, heads)
        out.append((f"{name}.lora_a", a.numpy()))
        out.append((f"{name}.lora_b", b.numpy()))
    return out


def write_lora_gguf(
    path: Path, weights, lora, config, out_type: str, name: str
) -> list[tuple[str, np.ndarray]]:
    """Write the adapter file to `path` (the caller makes it atomic); returns what was written (float32)."""
    import gguf

    from cura.export.gguf import CURA_KEY, FILE_TYPES, gguf_architecture

    arch, permute = gguf_architecture(config)
    tensors = lora_tensors(weights, config, arch, permute)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.scaling * lora.r))
    writer.add_name(name)
    writer.add_string(CURA_KEY, "cura")
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[out_type])))
    dtype = np.float32 if out_type == "f32" else np.float16
    for tensor_name, data in tensors:
        writer.add_tensor(tensor_name, data.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def check_lora_file(path: Path, expected, arch: str, alpha: float, out_type: str) -> None:
    """Read `path` back with gguf-py: metadata, every tensor's name, shape and values; CuraError otherwise."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def text(key: str):
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    meta = {"general.type": "adapter", "adapter.type": "lora", "general.architecture": arch}
    for key, want in meta.items():
        if text(key) != want:
            raise CuraError(
                f"{path}: {key} reads back as {text(key)!r}, not {want!r} (a writer bug; report it)"
            )
    if not abs(float(text("adapter.lora.alpha")) - alpha) <= 1e-6 * max(1.0, abs(alpha)):
        raise CuraError(f"{path}: adapter.lora.alpha reads back as {text('adapter.lora.alpha')}, not {alpha}")
    got = {t.name: t for t in reader.tensors}
    if sorted(got) != sorted(n for n, _ in expected):
        raise CuraError(f"{path}: the tensors read back are not the ones written (a writer bug; report it)")
    for name, data in expected:
        back = np.asarray(got[name].data, dtype=np.float32).reshape(data.shape)
        bound = READ_BACK_TOLERANCE[out_type] * float(np.abs(data).max(initial=0.0))
        if not float(np.abs(back - data).max(initial=0.0)) <= bound:
            raise CuraError(f"{path}: tensor {name} reads back with other values (a writer bug; report it)")


def modelfile_for_lora(output: Path, base_gguf: str, tokenizer, template) -> str:
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER this file, and the chat settings of the adapter."""
    from cura.export.gguf import MODELFILE_MARK
    from cura.export.template import modelfile_text

    text, _ = modelfile_text(output.name, tokenizer, template)
    rest = text.split("\n", 1)[1]  # all but modelfile_text's FROM line
    source = base_gguf if "/" in base_gguf else f"./{base_gguf}"  # as given, else beside the Modelfile
    lines = [
        "# FROM: the base the adapter was trained on, as trained (for QLoRA: its dequantized NF4 weights):",
        "#   cura export gguf --adapter ADAPTER --lora-only --with-base writes it beside the adapter",
        f"FROM {source}",
        f"ADAPTER ./{output.name}",
    ]
    return "\n".join(lines) + "\n" + rest + f"{MODELFILE_MARK} for {output.name}\n"


def export_lora_gguf(
    adapter,
    output,
    *,
    model_source=None,
    out_type: str = "f16",
    check: bool = True,
    overwrite: bool = False,
    verify: bool | None = None,
    base_gguf: str | None = None,
    with_base: bool = False,
    prompts=None,
    log=print,
):
    """Write `adapter` (a cura or PEFT adapter folder) as the llama.cpp LoRA GGUF `output`, plus an Ollama
    Modelfile `<output stem>.Modelfile` (FROM `base_gguf`, default `<output stem>-base.gguf`; ADAPTER
    `output`) and the report `<output>.verify.json`. With `with_base`, the base as trained (a QLoRA
    adapter's dequantized NF4 weights, which is what the adapter was fitted to) is written too, at
    `out_type`, as `<output stem>-base.gguf`, and the verification runs on that very file. See the module
    docstring for the checks. Nothing appears under the final names unless every check passed."""
    from cura.adapters import adapter_state_dict, load_base_for_adapter
    from cura.export.gguf import (
        REPORT_MARK,
        ExportReport,
        _want_verify,
        check_export_targets,
        gguf_architecture,
        gguf_name,
    )
    from cura.export.template import detect_style

    output = Path(output)
    if output.suffix.lower() != ".gguf":
        raise CuraError(f"--output {output} must end in .gguf; for example {output.with_suffix('.gguf')}")
    if out_type not in LORA_TYPES:
        raise CuraError(f"--type must be one of {', '.join(LORA_TYPES)} with --lora-only, got '{out_type}'")
    check_export_targets(output, overwrite)
    base_file = output.with_name(f"{output.stem}-base.gguf") if with_base else None
    if base_file is not None:
        if base_gguf:
            raise CuraError("--with-base writes the base beside the adapter; leave out --base-gguf")
        check_export_targets(base_file, overwrite)
    verify = _want_verify(verify)
    base = load_base_for_adapter(adapter, model_source, compute_dtype=torch.float32, device="cpu", log=log)
    model, tokenizer, lora = base.model.eval(), base.tokenizer, base.lora
    weights = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    arch, _ = gguf_architecture(model.config)
    alpha = float(lora.scaling * lora.r)
    modelfile = output.with_suffix(".Modelfile")
    result = ExportReport(output, modelfile, out_type, arch, 0, 0, warnings=list(base.warnings))
    template = getattr(tokenizer, "chat_template", None)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        written = write_lora_gguf(tmp, weights, lora, model.config, out_type, gguf_name(model.config, arch))
        result.tensors, result.bytes, result.types = (
            len(written),
            tmp.stat().st_size,
            f"{out_type.upper()} x {len(written)}",
        )
        log(f"wrote {output.name} (LoRA r={lora.r}, alpha {alpha:g}, {len(written)} tensors), checking it")
        if check:
            check_lora_file(tmp, written, arch, alpha, out_type)
        style = detect_style(tokenizer, template).style if template else None
        eot = (style.assistant_suffix.strip() or None) if style is not None else None
        if verify:
            result.llamacpp = _verify_on_base(
                model, lora, tokenizer, tmp, output, adapter, out_type, eot, prompts, log, keep_base=base_file
            )
        elif base_file is not None:
            _write_base_as_trained(model, tokenizer, base_file, out_type, eot, log)
        base_name = base_gguf or f"{output.stem}-base.gguf"
        write_text(modelfile, modelfile_for_lora(output, base_name, tokenizer, template))
    result.report = output.with_name(output.name + ".verify.json")
    write_json(
        result.report, {"written_by": REPORT_MARK, "lora_alpha": alpha, "lora_r": lora.r, **result.to_dict()}
    )
    log(f"wrote {output} and {modelfile}; report {result.report}")
    base_path = base_gguf or output.with_name(base_name)  # the default sits beside the adapter
    log(f"run it in llama.cpp:  llama-server -m {base_path} --lora {output} --jinja")
    log(f"run it in Ollama:     ollama create {output.stem.lower()} -f {modelfile}")
    return result


def _write_base_as_trained(model, tokenizer, path: Path, out_type: str, eot, log) -> None:
    """The base the adapter was trained on (LoRA taken off, 4-bit weights dequantized) as a GGUF at `path`
    (temporary name, renamed when written)."""
    from cura.adapters import unwrap_lora
    from cura.export.gguf import write_gguf
    from cura.nn.linear4bit import dequantize_model

    unwrap_lora(model)
    dequantize_model(model)
    with atomic_file(path) as tmp:
        write_gguf(model, tokenizer, tmp, out_type, getattr(tokenizer, "chat_template", None), eot)
    log(f"wrote {path} (the base as trained, {out_type}: what the LoRA GGUF expects under it)")


def _verify_on_base(
    model,
    lora_config,
    tokenizer,
    lora_file: Path,
    output: Path,
    adapter,
    out_type,
    eot,
    prompts,
    log,
    keep_base: Path | None = None,
) -> dict:
    """llama.cpp on the base as trained (float32 GGUF, temporary; with `keep_base`, at `out_type`, renamed
    to `keep_base` once verified) + `lora_file` vs transformers on the merged model. `model` (the base
    with the adapter on it) is merged in place."""
    from cura.adapters import adapter_state_dict, merge_lora, unwrap_lora
    from cura.export.gguf import SourceAnswers, write_gguf
    from cura.export.llamacpp import verify_in_llamacpp
    from cura.nn.linear4bit import dequantize_model

    template = getattr(tokenizer, "chat_template", None)
    adapter_weights = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    unwrap_lora(model)
    dequantize_model(model)
    with tempfile.TemporaryDirectory(prefix=f".{output.stem}.base.", dir=output.parent) as scratch:
        base_type = out_type if keep_base is not None else "f32"
        base_file = Path(scratch) / f"base-{base_type}.gguf"
        write_gguf(model, tokenizer, base_file, base_type, template, eot)
        model.load_state_dict(merge_lora(model.state_dict(), adapter_weights, lora_config), strict=True)
        source = SourceAnswers.compute(model, tokenizer, None, adapter, prompts, True, eot, log)
        log(
            f"llama.cpp: the base as trained ({base_type} GGUF) with the LoRA GGUF applied, against "
            "transformers merged"
        )
        try:
            report = verify_in_llamacpp(base_file, tokenizer, source, out_type, lora=[lora_file], log=log)
        except CuraError as exc:  # name the file the user asked for, not the temporary base
            raise CuraError(
                str(exc).replace(base_file.name, f"{output.name} on its base as trained")
            ) from None
        if keep_base is not None:  # verified: the base the user runs is the file llama.cpp just ran
            os.replace(base_file, keep_base)
            log(f"wrote {keep_base} (the base as trained, {base_type}: what the LoRA GGUF expects under it)")
        return report
