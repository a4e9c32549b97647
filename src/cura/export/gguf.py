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

from cura.atomic import atomic_file, write_text
from cura.errors import CuraError

OUT_TYPES = ("f32", "f16", "q8_0")
CURA_KEY = "cura.exported_by"
"""A GGUF metadata key cura writes into every file it exports: such a file may be replaced with --overwrite."""
MODELFILE_MARK = "# written by cura export"

# HF model_type -> (GGUF architecture, permute q/k rows for GGML rope)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# Parity tolerances on logits (max abs difference) when the GGUF is read back by transformers, for the
# weight rounding each type brings (measured on the tiny test models and the bundled 135M model).
# Bundled SmolLM2-135M (logits up to ~30): f16 0.099 measured.
TOLERANCES = {"f32": 1e-4, "f16": 0.25, "q8_0": 1.0}

PROBE_TEXTS = (
    "Hello, world! This is a test of the tokenizer.",
    "Numbers 12345 and symbols #$%& with  double  spaces\nand a new line.",
    "Ünïcödé: café, naïve, 日本語, emoji 🙂.",
)


@dataclass
class ExportReport:
    """What `export_gguf` wrote and how the read-back compared with the source."""

    output: Path
    modelfile: Path
    out_type: str
    architecture: str
    tensors: int
    bytes: int
    max_abs_logit_diff: float | None = None
    tolerance: float | None = None
    tokenizer_roundtrip: bool | None = None
    warnings: list[str] = field(default_factory=list)


def permute_qk(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: rows of each head reordered from halves to interleaved pairs."""
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


def tensor_type(name: str, tensor: np.ndarray, out_type: str):
    """(data, raw GGML type or None) for one tensor: 1-D tensors stay f32; q8_0 needs rows of 32k values."""
    import gguf

    if tensor.ndim == 1 or out_type == "f32":
        return tensor.astype(np.float32), None
    if out_type == "q8_0" and tensor.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(tensor.astype(np.float32), q), q
    return tensor.astype(np.float16), None


def gguf_name(config, arch: str) -> str:
    """`general.name`: the model folder's name. Note: never exactly "mistral": transformers' GGUF loader
    reads a llama file of that name as a Mistral architecture it cannot map (a Mistral model is written, as
    llama.cpp does, as the equivalent llama and loads back as LlamaForCausalLM)."""
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or f"cura-{arch}"
    return f"{name}-model" if name == "mistral" else name


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def gguf_tensors(model, arch: str, permute: bool):
    """(GGUF name, float32 numpy array) for every tensor to write, in llama.cpp's names and row order."""
    import gguf

    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
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
        if permute and key.endswith("q_proj.weight"):
            data = permute_qk(data, n_head, n_head)
        elif permute and key.endswith("k_proj.weight"):
            data = permute_qk(data, n_head, n_kv)
        yield name, data.numpy()


def write_gguf(
    model, tokenizer, path: Path, out_type: str, chat_template: str | None, eot: str | None
) -> int:
    """Write `model` + `tokenizer` as GGUF to `path` (through a temporary name); returns the tensor count."""
    import gguf

    if out_type not in OUT_TYPES:
        raise CuraError(f"--type must be one of {', '.join(OUT_TYPES)}, got '{out_type}'")
    arch, permute = gguf_architecture(model.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(gguf_name(model.config, arch))
        writer.add_string(CURA_KEY, "cura")
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[out_type])))
        write_hparams(writer, model.config)
        write_tokenizer(writer, tokenizer, int(model.config.vocab_size), chat_template, eot)
        count = 0
        for name, data in gguf_tensors(model, arch, permute):
            data, raw = tensor_type(name, data, out_type)
            writer.add_tensor(name, data, raw_dtype=raw)
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return count


@torch.no_grad()
def check_gguf(model, tokenizer, path: Path, texts=PROBE_TEXTS) -> tuple[float, bool]:
    """(max |logit difference| of the GGUF read back by transformers vs `model`, tokenizer round trip ok)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cura.models.gguf import gguf_args

    folder, file = gguf_args(path)  # the absolute path: a bare name may load another file (see gguf_args)
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    same_ids = all(tokenizer(t).input_ids == back_tok(t).input_ids for t in texts)
    worst = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text).input_ids])
        ref = model(input_ids=ids).logits.float()
        got = back(input_ids=ids).logits.float()
        worst = max(worst, (ref - got).abs().max().item())
    return worst, same_ids


def export_gguf(
    model_source,
    output,
    *,
    adapter=None,
    out_type: str = "f16",
    check: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
    log=print,
) -> ExportReport:
    """Export `model_source` (HF folder | .gguf | bnb folder | "smollm2-135m"), with `adapter` merged in when
    given (into the base it records; `model_source` None: that one), to the GGUF file `output` of type `out_type` (f16 | f32 | q8_0), plus an Ollama `Modelfile`
    beside it. With `check`, the file is read back with transformers' GGUF loader: logits must agree with
    the source within `tolerance` (default `TOLERANCES[out_type]`) and the tokenizer must give the same ids;
    otherwise CuraError. Returns an `ExportReport`."""
    from cura.export.template import detect_style, modelfile_text

    output = Path(output)
    if output.suffix.lower() != ".gguf":
        raise CuraError(f"--output {output} must end in .gguf; for example {output.with_suffix('.gguf')}")
    if out_type not in OUT_TYPES:
        raise CuraError(f"--type must be one of {', '.join(OUT_TYPES)}, got '{out_type}'")
    check_export_targets(output, overwrite)
    warnings: list[str] = []
    if adapter is not None:  # merged in memory in float32, so the GGUF's only rounding is its own type
        from cura.export.merge import merge_in_memory

        merged = merge_in_memory(model_source, adapter, log=log)
        model, tokenizer, warnings = merged.model, merged.tokenizer, merged.warnings
    else:
        model, tokenizer = _load_full(model_source)
    template = getattr(tokenizer, "chat_template", None)
    style = detect_style(tokenizer, template).style if template else None
    eot = (style.assistant_suffix.strip() or None) if style is not None else None
    count = write_gguf(model, tokenizer, output, out_type, template, eot)
    text, warning = modelfile_text(output.name, tokenizer, template)
    if warning:
        warnings.append(warning)
        log(f"warning: {warning}")
    modelfile = output.with_name("Modelfile")
    write_text(modelfile, f"{text}{MODELFILE_MARK} for {output.name}\n")
    arch, _ = gguf_architecture(model.config)
    result = ExportReport(output, modelfile, out_type, arch, count, output.stat().st_size, warnings=warnings)
    log(f"wrote {output} ({out_type}, {count} tensors, {result.bytes / 2**20:.1f} MiB) and {modelfile}")
    if check:
        verify_export(result, model, tokenizer, tolerance, log)
    return result


def _written_by_cura(path: Path) -> bool:
    """Whether `path` is a file cura exported: a GGUF with `CURA_KEY`, or a Modelfile with cura's mark."""
    if path.name == "Modelfile":
        try:
            return MODELFILE_MARK in path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    import gguf

    try:
        return CURA_KEY in gguf.GGUFReader(str(path)).fields
    except Exception:  # not a GGUF at all (or a damaged one): not ours
        return False


def check_export_targets(output: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded, to replace a .gguf or Modelfile that cura did not write, and one
    it did without `overwrite`."""
    for path in (output, output.with_name("Modelfile")):
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


def verify_export(result: ExportReport, model, tokenizer, tolerance: float | None, log=print) -> None:
    """Read the written file back with transformers' GGUF loader: the tokenizer must give the same ids and
    the logits must agree with `model` within `tolerance` (default `TOLERANCES[type]`); else CuraError."""
    output, out_type = result.output, result.out_type
    result.tolerance = TOLERANCES[out_type] if tolerance is None else tolerance
    result.max_abs_logit_diff, result.tokenizer_roundtrip = check_gguf(model, tokenizer, output)
    log(
        f"parity: max |logit diff| {result.max_abs_logit_diff:.3g} (tolerance {result.tolerance:g} for "
        f"{out_type}); tokenizer round trip {'ok' if result.tokenizer_roundtrip else 'DIFFERS'}"
    )
    if not result.tokenizer_roundtrip:
        raise CuraError(
            f"{output}: the tokenizer read back from the GGUF gives other token ids than the source "
            "tokenizer; report this with the model's tokenizer.json"
        )
    if result.max_abs_logit_diff > result.tolerance:
        raise CuraError(
            f"{output}: logits read back differ from the source by {result.max_abs_logit_diff:.3g}, above "
            f"the tolerance {result.tolerance:g} for {out_type}; export with --type f32 or f16 to check, "
            "or pass --tolerance if this is expected"
        )
