"""Export a transformers model (optionally with a LoRA adapter merged in) to a GGUF file for llama.cpp/Ollama.

The layout follows llama.cpp's `convert_hf_to_gguf.py` (LlamaModel, Qwen2Model):

    metadata   general.architecture = llama | qwen2, <arch>.context_length, .embedding_length, .block_count,
               .feed_forward_length, .attention.head_count(_kv), .rope.freq_base, .rope.dimension_count,
               .attention.layer_norm_rms_epsilon, .vocab_size, general.file_type
    tokenizer  tokenizer.ggml.model = gpt2 (byte-level BPE): tokens, token_type (1 normal, 3 control,
               4 user-defined), merges, pre; bos/eos/pad/eot ids; add_bos_token; tokenizer.chat_template
    tensors    names from gguf's own TensorNameMap (model.layers.N.self_attn.q_proj -> blk.N.attn_q, ...),
               2-D weights in the chosen type (f32 | f16 | q8_0), 1-D tensors (norms, biases) in f32

Note (rotary permutation): HF Llama checkpoints apply rotary embedding to the two *halves* of each head
(rotate_half), GGML's llama rope to *adjacent pairs*. convert_hf_to_gguf.py therefore reorders the rows of
q_proj and k_proj per head (`LlamaModel.permute`):

    W.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(W.shape)      (n_head_kv for k_proj)

so that row pair (2i, 2i+1) of a head holds HF rows (i, i + head_dim/2). transformers' GGUF loader undoes it
(`LlamaTensorProcessor._reverse_permute_weights`), which is what the parity check exercises. Qwen2 uses
NEOX-style rope in GGML (halves, like HF) and is written unpermuted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cura.atomic import atomic_file, write_json, write_text
from cura.errors import CuraError

OUT_TYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
CURA_KEY = "cura.exported_by"
"""A GGUF metadata key cura writes into every file it exports: such a file may be replaced with --overwrite."""
MODELFILE_MARK = "# written by cura export"
REPORT_MARK = "cura export"  # the `written_by` of the verification report beside the file

# HF model_type -> (GGUF architecture, permute q/k rows for GGML rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# The read-back check compares the file with the source whose weights were rounded exactly as written, so
# only float32 summation order separates them (measured: ~1e-5 on the tiny models, ~1e-4 on SmolLM2-135M
# whose logits reach ~30). Anything larger is a tensor written wrong, whatever the type.
WRITER_TOLERANCE = 2e-3
TOLERANCES = {t: WRITER_TOLERANCE for t in OUT_TYPES}  # --tolerance help: the same for every type

PROBE_TEXTS = (
    "Hello, world! This is a test of the tokenizer.",
    "Numbers 12345 and symbols #$%& with  double  spaces\nand a new line.",
    "Ünïcödé: café, naïve, 日本語, emoji 🙂.",
)


@dataclass
class ExportReport:
    """What `export_gguf` wrote and how the checks compared it with the source."""

    output: Path
    modelfile: Path
    out_type: str
    architecture: str
    tensors: int
    bytes: int
    types: str = ""
    max_abs_logit_diff: float | None = None  # read back vs the source rounded as written (writer bugs)
    tolerance: float | None = None
    tokenizer_roundtrip: bool | None = None
    rounding: dict | None = None  # probes.Agreement of the read-back with the unrounded source
    llamacpp: dict | None = None  # cura.export.llamacpp.verify_in_llamacpp
    report: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        out["format"] = 1
        return out


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: rows of each head reordered from halves to interleaved pairs
    (`n_head_kv`, when given and different, is the head count of this matrix, as for k_proj)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta if theta is not None else getattr(config, "rope_theta", None)
    return float(theta if theta is not None else 10000.0)


def _check_rope(config) -> None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise CuraError(
            f"the model's config.json uses rope scaling '{kind}', which cura's GGUF export does not write yet; "
            "convert this model with llama.cpp's convert_hf_to_gguf.py"
        )


def gguf_architecture(config) -> tuple[str, bool]:
    """(GGUF architecture, permute q/k) for a transformers config; CuraError for unsupported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise CuraError(
            f"cura exports GGUF for {', '.join(ARCHITECTURES)} models, not '{model_type}' (config.json "
            "model_type); use llama.cpp's convert_hf_to_gguf.py for this model"
        )
    return ARCHITECTURES[model_type]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_hparams(writer, config) -> None:
    """The hyperparameters llama.cpp reads for a Llama-family model."""
    _check_rope(config)
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))


TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def vocab_lists(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the model's vocab size as `[PAD<i>]`, unused) and their GGUF token types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise CuraError(
            f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size} (config.json); "
            "resize the model's embeddings to the tokenizer before exporting"
        )
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL)
    return tokens, types


def bpe_model(tokenizer) -> dict:
    """The `model` section of the tokenizer's tokenizer.json; CuraError unless it is byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE" or "ByteLevel" not in backend.to_str():
        raise CuraError(
            "cura's GGUF export writes byte-level BPE tokenizers (GPT-2 style, as in SmolLM2, Llama 3, Qwen2) "
            "and this model's tokenizer is not one; use llama.cpp's convert_hf_to_gguf.py for it"
        )
    return model


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's `tokenizer.ggml.pre` (the split rule llama.cpp applies before BPE; see its
    `get_vocab_base_pre`), detected from the tokenizer rather than from a table of hashes:

    - the Llama-3 split regex -> "llama-bpe"; Qwen2's -> "qwen2"
    - GPT-2's byte-level split where digits are single tokens -> "smollm" (SmolLM splits every digit; a
      transformers tokenizer read from a GGUF loses that rule, but the vocabulary still shows it: no token
      longer than one character contains an ASCII digit)
    - otherwise GPT-2's -> "gpt-2"
    """
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = json.dumps(data.get("pre_tokenizer"))
    if "p{N}{1,3}" in pre and "(?i:'s|'t" in pre:
        return "llama-bpe"
    if "p{N}| ?[^" in pre:
        return "qwen2"
    if '"individual_digits": true' in pre:
        return "smollm"
    vocab = tokenizer.get_vocab()
    if not any(len(t) > 1 and any(c in "0123456789" for c in t) for t in vocab):
        return "smollm"
    return "gpt-2"


def merges_list(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def write_tokenizer(writer, tokenizer, vocab_size: int, chat_template: str | None, eot: str | None) -> None:
    """Tokens, types, merges, pre-tokenizer, special ids and chat template, as convert_hf_to_gguf.py does."""
    model = bpe_model(tokenizer)
    tokens, types = vocab_lists(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges_list(model))
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "eot": tokenizer.convert_tokens_to_ids(eot) if eot else None,
    }
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for name, token_id in ids.items():
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            adders[name](token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if chat_template:
        writer.add_chat_template(chat_template)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's `use_more_bits` (llama-quant.cpp): the first and last eighth of the layers and every
    third one between get the larger type in the _M mixes."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


# a type llama.cpp cannot use for a row length (not a multiple of its block) -> the one it falls back to
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ggml_type(name: str, shape: tuple[int, ...], out_type: str, n_layer: int, has_output: bool) -> str:
    """The tensor type `llama-quantize` picks for one tensor of a `--type` export (`llama_tensor_get_type`
    in llama-quant.cpp, for the types cura writes, without an imatrix):

    - 1-D tensors (norms, biases): F32; f32 / f16 exports: that type everywhere
    - q8_0: Q8_0 (F16 where a row is not a multiple of 32, as convert_hf_to_gguf.py does)
    - the output matrix (or the token embedding when it is tied to the output): Q6_K for every quantized
      type but q8_0
    - q4_k_m / q5_k_m: Q4_K / Q5_K, with attn_v and ffn_down in Q6_K for the layers `use_more_bits` names
    - a K type that does not fit the row length falls back as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1,
      Q6_K -> Q8_0), and to F16 when that does not fit either
    """
    from cura.export.ggml_quants import fits

    if len(shape) == 1 or out_type == "f32":
        return "F32"
    if out_type == "f16":
        return "F16"
    if out_type == "q8_0":
        return "Q8_0" if fits(shape[-1], "Q8_0") else "F16"
    qtype = {"q4_0": "Q4_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K"}[out_type]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        qtype = "Q6_K" if fits(shape[-1], "Q6_K") else "Q8_0"
    elif out_type in ("q4_k_m", "q5_k_m") and (".attn_v." in name or ".ffn_down" in name):
        if use_more_bits(layer, n_layer):
            qtype = "Q6_K"
    if not fits(shape[-1], qtype):
        qtype = FALLBACK.get(qtype, "F16")
        if not fits(shape[-1], qtype):
            qtype = "F16"
    return qtype


def encode(tensor: np.ndarray, qtype: str):
    """(array to write, raw GGML type for `add_tensor` or None) of a float32 tensor in `qtype`."""
    import gguf

    from cura.export.ggml_quants import quantize

    if qtype == "F32":
        return tensor.astype(np.float32), None
    if qtype == "F16":
        return tensor.astype(np.float16), None
    return quantize(tensor, qtype), gguf.GGMLQuantizationType[qtype]


def decode(data: np.ndarray, qtype: str) -> np.ndarray:
    """What llama.cpp reads back from `encode`'s array, in float32 (gguf-py's dequantizers)."""
    from cura.export.ggml_quants import dequantize

    if qtype in ("F32", "F16"):
        return data.astype(np.float32)
    return dequantize(data, qtype)


def gguf_name(config, arch: str) -> str:
    """`general.name`: the model folder's name. Note: never exactly "mistral": transformers' GGUF loader
    reads a llama file of that name as a Mistral architecture it cannot map (a Mistral model is written, as
    llama.cpp does, as the equivalent llama and loads back as LlamaForCausalLM)."""
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or f"cura-{arch}"
    return f"{name}-model" if name == "mistral" else name


FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_0": "MOSTLY_Q4_0",
}


def _qk_heads(key: str, config) -> int | None:
    """Heads of a q_proj / k_proj weight (the rows `permute_qk` reorders), None for any other tensor."""
    if key.endswith("q_proj.weight"):
        return config.num_attention_heads
    if key.endswith("k_proj.weight"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_tensors(model, arch: str, permute: bool):
    """(GGUF name, float32 numpy array, transformers key) for every tensor to write, in llama.cpp's names
    and row order."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key, tensor in model.state_dict().items():
        if key in tied or key.endswith("rotary_emb.inv_freq"):
            continue  # a tied lm_head is absent from the file, as llama.cpp expects
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CuraError(
                f"tensor '{key}' of the model has no GGUF name for architecture {arch}; this model variant is not "
                "supported by cura's export, use llama.cpp's convert_hf_to_gguf.py"
            )
        data = tensor.detach().to(torch.float32)
        heads = _qk_heads(key, config) if permute else None
        if heads is not None:
            data = permute_qk(data, heads)
        yield name, data.numpy(), key


@dataclass
class Written:
    """What `write_gguf` put in the file: tensor count, type per tensor, and each tensor rounded to its type
    as llama.cpp reads it back (float32, transformers' key and row order): the reference that isolates
    writer bugs (names, row order, shapes, hyperparameters, tokenizer) from rounding. The quantizers' own
    bytes are tested against gguf-py's (`tests/test_gguf_quants.py`) and in llama.cpp."""

    tensors: int
    types: dict[str, str]
    rounded: dict[str, torch.Tensor]


def write_gguf(
    model, tokenizer, path: Path, out_type: str, chat_template: str | None, eot: str | None
) -> Written:
    """Write `model` + `tokenizer` as GGUF to `path` (the caller makes it atomic)."""
    import gguf

    if out_type not in OUT_TYPES:
        raise CuraError(f"--type must be one of {', '.join(OUT_TYPES)}, got '{out_type}'")
    config = model.config
    arch, permute = gguf_architecture(config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(gguf_name(config, arch))
    writer.add_string(CURA_KEY, "cura")
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[out_type])))
    write_hparams(writer, config)
    write_tokenizer(writer, tokenizer, int(config.vocab_size), chat_template, eot)
    tensors = list(gguf_tensors(model, arch, permute))
    has_output = any(name == "output.weight" for name, _, _ in tensors)
    types, rounded, state = {}, {}, model.state_dict()
    for name, data, key in tensors:
        qtype = ggml_type(name, data.shape, out_type, int(config.num_hidden_layers), has_output)
        encoded, raw = encode(data, qtype)
        writer.add_tensor(name, encoded, raw_dtype=raw)
        if permute and _qk_heads(key, config) is not None:
            # rounded in transformers' row order, independently of the permutation the file holds (blocks
            # lie within rows, so rounding commutes with a row permutation): a permutation bug shows
            hf = state[key].detach().to(torch.float32).numpy()
            rounded[key] = torch.from_numpy(decode(encode(hf, qtype)[0], qtype).reshape(hf.shape))
        else:
            rounded[key] = torch.from_numpy(decode(encoded, qtype).reshape(data.shape))
        types[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Written(len(tensors), types, rounded)


def type_summary(types: dict[str, str]) -> str:
    """ "Q4_K x 150, Q6_K x 40, F32 x 61": how many tensors of each type a file holds."""
    from collections import Counter

    return ", ".join(f"{t} x {n}" for t, n in Counter(types.values()).most_common())


@torch.no_grad()
def read_back(path: Path):
    """The GGUF loaded by transformers' own GGUF loader (float32), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cura.models.gguf import gguf_args

    folder, file = gguf_args(path)  # the absolute path: a bare name may load another file (see gguf_args)
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32).eval()
    return back, AutoTokenizer.from_pretrained(folder, gguf_file=file)


def export_gguf(
    model_source,
    output,
    *,
    adapter=None,
    out_type: str = "f16",
    check: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
    verify: bool | None = None,
    prompts=None,
    log=print,
) -> ExportReport:
    """Export `model_source` (HF folder | .gguf | bnb folder | "smollm2-135m"), with `adapter` merged in when
    given (into the base it records; `model_source` None: that one), to the GGUF file `output` of type
    `out_type` (see `OUT_TYPES`), plus an Ollama Modelfile `<output stem>.Modelfile` beside it.

    With `check`, the file is read back with transformers' GGUF loader and compared with the source whose
    weights were rounded exactly as written (`Written.rounded`): any difference beyond float32 summation
    order (`tolerance`, default `WRITER_TOLERANCE`) is a writer bug, and the tokenizer must give the same
    ids. The rounding itself is reported as answer agreement with the unrounded source (`probes`). With
    `verify` (default: when xllamacpp is installed) llama.cpp loads the file and its answers are compared
    with transformers' (`cura.export.llamacpp`). The file and the Modelfile appear under their names only
    when every check passed; the report is saved beside the file as `<output>.verify.json`."""
    from cura.export.template import detect_style

    output = Path(output)
    if output.suffix.lower() != ".gguf":
        raise CuraError(f"--output {output} must end in .gguf; for example {output.with_suffix('.gguf')}")
    if out_type not in OUT_TYPES:
        raise CuraError(f"--type must be one of {', '.join(OUT_TYPES)}, got '{out_type}'")
    check_export_targets(output, overwrite)
    verify = _want_verify(verify)
    warnings: list[str] = []
    if adapter is not None:  # merged in memory in float32, so the GGUF's only rounding is its own type
        from cura.export.merge import merge_in_memory

        merged = merge_in_memory(model_source, adapter, log=log)
        model, tokenizer, warnings = merged.model, merged.tokenizer, merged.warnings
    else:
        model, tokenizer = _load_full(model_source)
    model.eval()
    template = getattr(tokenizer, "chat_template", None)
    style = detect_style(tokenizer, template).style if template else None
    eot = (style.assistant_suffix.strip() or None) if style is not None else None
    arch, _ = gguf_architecture(model.config)
    modelfile = output.with_suffix(".Modelfile")
    result = ExportReport(output, modelfile, out_type, arch, 0, 0, warnings=warnings)
    source = SourceAnswers.compute(model, tokenizer, model_source, adapter, prompts, verify, eot, log)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output) as tmp:
        written = write_gguf(model, tokenizer, tmp, out_type, template, eot)
        result.tensors, result.bytes = written.tensors, tmp.stat().st_size
        result.types = type_summary(written.types)
        log(f"wrote {output.name} ({out_type}: {result.types}; {result.bytes / 2**20:.1f} MiB), checking it")
        if check:
            verify_export(result, model, tokenizer, tmp, written, source, tolerance, log)
        written = None
        if verify:
            from cura.export.llamacpp import verify_in_llamacpp

            result.llamacpp = verify_in_llamacpp(tmp, tokenizer, source, out_type, log=log)
        text, warning = _modelfile(output, tokenizer, template, result)
        write_text(modelfile, text)
    result.report = output.with_name(output.name + ".verify.json")
    write_json(result.report, {"written_by": REPORT_MARK, **result.to_dict()})
    log(f"wrote {output} and {modelfile}; report {result.report}")
    for line in run_commands(result):
        log(line)
    return result


def _want_verify(verify: bool | None) -> bool:
    """--verify default: on when xllamacpp is installed; asked for explicitly, it must be."""
    from cura.optional import available, require

    if verify is None:
        return available("xllamacpp")
    if verify:
        require("xllamacpp", extra="llamacpp", purpose="cura export gguf --verify")
    return verify


def _modelfile(output: Path, tokenizer, template, result: ExportReport) -> tuple[str, str | None]:
    from cura.export.template import modelfile_text

    text, warning = modelfile_text(output.name, tokenizer, template)
    if warning:
        result.warnings.append(warning)
    return f"{text}{MODELFILE_MARK} for {output.name}\n", warning


def run_commands(result: ExportReport) -> list[str]:
    """How to run what was written, and the prompt settings that were verified."""
    name = result.output.stem.lower().replace("_", "-").replace(".", "-")
    lines = [
        f"run it in llama.cpp:  llama-server -m {result.output} --jinja",
        f"run it in Ollama:     ollama create {name} -f {result.modelfile} && ollama run {name}",
    ]
    cpp = result.llamacpp or {}
    if cpp:
        lines.append(
            f"verified in llama.cpp {cpp.get('version', '')}: chat template rendered by llama.cpp (--jinja) "
            f"{'identical' if cpp.get('prompt_identical') else 'DIFFERENT'}, token ids "
            f"{'identical' if cpp.get('ids_identical') else 'DIFFERENT'}, stops at {cpp.get('stop_token')!r}"
        )
    return lines


def _written_by_cura(path: Path) -> bool:
    """Whether `path` is a file cura exported: a GGUF with `CURA_KEY`, or a Modelfile with cura's mark."""
    if path.name.endswith("Modelfile"):
        try:
            return MODELFILE_MARK in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    if path.name.endswith(".verify.json"):
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("written_by") == REPORT_MARK
        except (OSError, ValueError, AttributeError):
            return False
    import gguf

    try:
        return CURA_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # not a GGUF at all (or a damaged one): not ours
        return False


def check_export_targets(output: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded, to replace a .gguf or Modelfile that cura did not write, and one
    it did without `overwrite`."""
    for path in (output, output.with_suffix(".Modelfile"), output.with_name(output.name + ".verify.json")):
        if not path.exists():
            continue
        if path.is_dir():
            raise CuraError(f"{path} is a folder; give --output a .gguf file name in another place")
        if not _written_by_cura(path):
            raise CuraError(
                f"{path} exists and was not written by cura export; cura never replaces it: choose an --output "
                "in another folder or move the file"
            )
        if not overwrite:
            raise CuraError(
                f"{path} exists (an earlier cura export); pass --overwrite to replace it, or choose another "
                "--output"
            )


def _load_full(model_source):
    """The model in float32 (no 4-bit) and its tokenizer, from any source `cura.models` reads."""
    from cura.models import load_model

    loaded = load_model(model_source, quantize=False, compute_dtype=torch.float32)
    return loaded.model, loaded.tokenizer


@dataclass
class SourceAnswers:
    """The source model (merged, unrounded, float32 in transformers) on the probes: what the export must
    reproduce. Computed before the weights are rounded in place."""

    where: str
    conversations: list
    probes: list
    logits: list
    greedy: list  # (prompt ids, probes.Greedy) per conversation
    stop_ids: set
    max_new_tokens: int
    eot: str | None = None

    @classmethod
    def compute(
        cls, model, tokenizer, model_source, adapter, prompts, verify: bool, eot: str | None, log
    ) -> SourceAnswers:
        from cura.export import probes as P
        from cura.generate import stop_token_ids

        if prompts is not None:
            conversations, where = list(prompts), "the given prompts"
        else:
            conversations, where = P.held_out_conversations(P.run_folder_of(model_source, adapter))
        if not getattr(tokenizer, "chat_template", None):
            conversations, where = [], "none (the model has no chat template)"
        probes = P.make_probes(tokenizer, conversations)
        stops = set(stop_token_ids(tokenizer))
        answers, longest = [], max((len(p.ids) - p.start for p in probes), default=16)
        max_new = min(256, longest + 8)
        if verify:
            log(f"transformers' greedy answers to {len(probes)} conversations from {where}")
            for probe in probes:
                prompt = probe.ids[: probe.start]
                answers.append((prompt, P.greedy(model, prompt, stops, max_new)))
        logits = P.answer_logits(model, probes)
        return cls(where, conversations, probes, logits, answers, stops, max_new, eot)


def verify_export(
    result: ExportReport,
    model,
    tokenizer,
    path: Path,
    written: Written,
    source: SourceAnswers,
    tolerance,
    log,
) -> None:
    """Read `path` back with transformers' GGUF loader and compare (see `export_gguf`); CuraError naming
    what differed. `model`'s weights are replaced by `written.rounded` (in place: no second copy)."""
    from cura.export import probes as P

    result.tolerance = WRITER_TOLERANCE if tolerance is None else tolerance
    back, back_tok = read_back(path)
    ids_ok = all(tokenizer(t).input_ids == back_tok(t).input_ids for t in PROBE_TEXTS)
    ids_ok = ids_ok and all(
        P.render_ids(tokenizer, c, False) == P.render_ids(back_tok, c, False) for c in source.conversations
    )
    result.tokenizer_roundtrip = ids_ok
    probes = source.probes or P.make_probes(tokenizer, [])
    text_probes = [P.Probe(tokenizer(t).input_ids, 1) for t in PROBE_TEXTS]
    got = P.answer_logits(back, probes + text_probes)
    rounding = P.agreement(source.logits, got[: len(probes)], probes) if probes else None
    model.load_state_dict(written.rounded, strict=False)
    rounded = P.answer_logits(model, probes + text_probes)
    result.max_abs_logit_diff = P.max_abs_diff(rounded, got)
    result.rounding = rounding.to_dict() if rounding else None
    log(
        f"read back by transformers: max |logit diff| {result.max_abs_logit_diff:.3g} against the source with "
        f"its weights rounded to {result.out_type} as written (writer tolerance {result.tolerance:g}); tokenizer "
        f"{'gives the same ids' if ids_ok else 'DIFFERS'}"
    )
    if rounding:
        log(f"rounding to {result.out_type} vs the unrounded source ({source.where}): {rounding}")
    if not ids_ok:
        raise CuraError(
            f"{result.output}: the tokenizer read back from the GGUF gives other token ids than the source "
            "tokenizer (nothing was written); report this with the model's tokenizer.json"
        )
    if not result.max_abs_logit_diff <= result.tolerance:
        worst = max(range(len(got)), key=lambda i: float((rounded[i] - got[i]).abs().max()))
        raise CuraError(
            f"{result.output}: the file read back differs from the source rounded to {result.out_type} by "
            f"{result.max_abs_logit_diff:.3g} in logits (probe {worst + 1}), above {result.tolerance:g}: the "
            "rounding is excluded, so a tensor was written wrong (nothing was written); report this"
        )
