"""Merge a LoRA adapter into its base model and save a plain transformers checkpoint.

    adapter record ──load_base_for_adapter (the recorded base)──> NF4 base + adapter = reference
                                                              │
                                          unwrap + dequantize_model
                                                              ▼
                       W' = dequant(W_nf4) + scale * B @ A   (float32, cura.adapters.merge_lora)
                                                              ▼
                 output/  model.safetensors (dtype), config.json, generation_config.json, tokenizer files with
                          the adapter's chat template, cura_merge.json (written to a temp folder, renamed
                          into place; an existing --output is replaced only when it is a cura merge output
                          holding nothing else, and only with --overwrite)
                                                              ▼
                 parity: logits of output/ loaded with plain transformers vs the reference, on a few samples

Note (which base to merge into): a QLoRA adapter was trained against the *dequantized NF4* weights, not the
original full-precision ones: its update compensates for the NF4 rounding it saw in every forward pass
(QLoRA, Dettmers et al. 2023, arXiv 2305.14314, sec. 3: `Y = X doubleDequant(c1, c2, W_NF4) + X L1 L2`).
Adding B @ A to the original W instead gives a model that the adapter never met; the difference is the
quantization error of W, which is large next to a small LoRA update. See the discussion in
huggingface/peft#2105 ("the correct way to merge is to merge the 16 bit adapters onto a model that has
been quantized and then dequantized") and huggingface/peft#1080. cura therefore rebuilds the base exactly
as training did from the adapter's record (`BaseSpec`: same source, quant_type, blocksize, double
quantization, skipped modules; `cura.adapters.load_base_for_adapter`), dequantizes it, and merges into
that. The parity reference is the adapter on that same rebuilt base, so the record is what keeps it honest:
a `--model` or setting that disagrees with it is refused before anything is loaded.
A plain LoRA adapter (method "lora") is merged into the full-precision base.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cura.adapters import lora_layers
from cura.atomic import atomic_folder, check_replaceable, write_json
from cura.constants import COMPUTE_DTYPES, DEFAULT_LOSS_CHUNK_TOKENS
from cura.errors import CuraError
from cura.models.base import BaseSpec

DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES if name != "auto"}  # --dtype choices
DEFAULT_DTYPE = "float32"
MERGE_RECORD = "cura_merge.json"
"""Written into every merged folder: marks it as cura's, so a later merge to the same --output may replace it."""

# Max |logit difference| between the merged checkpoint and adapter-on-base: float32 only sees summation
# order (W x + B A x vs (W + B A) x); half types add the rounding of every weight to 8 or 11 mantissa bits.
# Measured on the bundled SmolLM2-135M with a random r=2 adapter: bfloat16 0.375, float16 0.068.
TOLERANCES = {"float32": 1e-3, "float16": 0.25, "bfloat16": 2.0}

SAMPLE_CONVERSATIONS = (
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "user", "content": "Write a haiku about autumn leaves."},
        {
            "role": "assistant",
            "content": "Red leaves drift and fall,\nquiet paths of gold and rust,\nthe year exhales slow.",
        },
    ],
    [
        {"role": "user", "content": "Add 17 and 25, then explain."},
        {"role": "assistant", "content": "17 + 25 = 42: seven plus five is twelve, carry the one."},
    ],
)


@dataclass
class MergeReport:
    """What `merge` wrote and how the merged checkpoint compares with the adapter on its base."""

    output: Path
    dtype: str
    merged_modules: int
    quantized_4bit: bool = False
    max_abs_logit_diff: float | None = None
    perplexity_adapter: float | None = None
    perplexity_merged: float | None = None
    tolerance: float | None = None
    warnings: list[str] = field(default_factory=list)


def sample_ids(tokenizer, template: str | None) -> list[torch.Tensor]:
    """Token ids (1, T) of the sample conversations rendered with `template` (plain text without one)."""
    out = []
    for convo in SAMPLE_CONVERSATIONS:
        if template:
            text = tokenizer.apply_chat_template(convo, chat_template=template, tokenize=False)
        else:
            text = "\n".join(m["content"] for m in convo)
        out.append(torch.tensor([tokenizer(text, add_special_tokens=False).input_ids]))
    return out


@torch.no_grad()
def logits_and_perplexity(model, samples: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Float32 logits per sample and the perplexity exp(mean next-token loss) over all of them."""
    from cura.train.steps import loss_sum  # the training loss (one cross-entropy), every token trained

    logits, total, count = [], 0.0, 0
    for ids in samples:
        logits.append(model(input_ids=ids).logits.float())
        loss, n = loss_sum(model, {"input_ids": ids, "labels": ids}, DEFAULT_LOSS_CHUNK_TOKENS)
        total, count = total + loss.item(), count + n
    return logits, math.exp(total / max(count, 1))


def merged_state_dict(model, config) -> dict[str, torch.Tensor]:
    """Unwrap and dequantize `model` (which carries the loaded adapter), then merge in float32 (pure)."""
    from cura.adapters import adapter_state_dict, merge_lora, unwrap_lora
    from cura.nn.linear4bit import dequantize_model

    adapter = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    unwrap_lora(model)
    dequantize_model(model)
    return merge_lora(model.state_dict(), adapter, config)


def save_merged(model, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """Write a merged model as a standard transformers folder (no quantization_config)."""
    model.to(dtype)
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF or bnb marker would make transformers treat it as quantized
    config.dtype = dtype
    model.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


@dataclass
class Merged:
    """A merged model in memory (float32) with its tokenizer, carrying the adapter's chat template."""

    model: Any
    tokenizer: Any
    spec: BaseSpec
    merged_modules: int
    warnings: list[str]
    samples: list[torch.Tensor] | None = None
    reference_logits: list[torch.Tensor] | None = None
    reference_perplexity: float | None = None


def load_reference(model_source, adapter_dir, log=print):
    """The adapter on exactly the base it was trained on (`load_base_for_adapter`), float32 on the CPU."""
    from cura.adapters import load_base_for_adapter

    return load_base_for_adapter(
        adapter_dir, model_source, compute_dtype=torch.float32, device="cpu", log=log
    )


def merge_in_memory(model_source, adapter_dir, *, reference: bool = False, log=print) -> Merged:
    """Load the base as in training with the adapter on it, (optionally record reference logits of the
    adapter on that base), then dequantize and merge in float32. The tokenizer carries the adapter's chat
    template; a differing base template is reported as a warning (see `check_template`)."""
    base = load_reference(model_source, adapter_dir, log)
    model, tokenizer = base.model, base.tokenizer
    merged = Merged(model, tokenizer, base.spec, len(lora_layers(model)), base.warnings)
    if reference:  # the adapter on the quantized base, exactly as training saw it
        merged.samples = sample_ids(tokenizer, getattr(tokenizer, "chat_template", None))
        merged.reference_logits, merged.reference_perplexity = logits_and_perplexity(model, merged.samples)
    model.load_state_dict(merged_state_dict(model, base.lora), strict=True)
    return merged


def merge(
    model_source,
    adapter_dir,
    output_dir,
    *,
    dtype: str = DEFAULT_DTYPE,
    check: bool = True,
    tolerance: float | None = None,
    quantize_4bit: bool = False,
    overwrite: bool = False,
    log=print,
) -> MergeReport:
    """Merge the adapter in `adapter_dir` into its base and save the result to `output_dir`.

    The base is rebuilt as in training from the adapter's record (`model_source` None: the recorded one; a
    `model_source` that is not it is refused; see the module note),
    dequantized, and `W + scale * B @ A` is added in float32; the folder holds weights in `dtype`
    (float32 | bfloat16 | float16), config, generation config and the tokenizer with the adapter's chat
    template. With `check`, the saved folder is loaded back with plain transformers and its logits compared
    with the adapter on its base: CuraError above `tolerance` (default `TOLERANCES[dtype]`).
    `quantize_4bit` re-quantizes the merged model to the bitsandbytes 4-bit layout (`save_quantized`).
    A non-empty `output_dir` is refused unless it is an earlier merge (its cura_merge.json lists every file
    in it) and `overwrite` is set."""
    from cura.models import load_model, save_quantized

    if dtype not in DTYPES:
        raise CuraError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    output_dir = Path(output_dir).absolute()  # `--output .` has a name and a parent (then is refused)
    check_output(output_dir, overwrite)
    merged = merge_in_memory(model_source, adapter_dir, reference=check, log=log)
    report = MergeReport(output_dir, dtype, merged.merged_modules, quantize_4bit, warnings=merged.warnings)
    report.perplexity_adapter = merged.reference_perplexity
    record = {"format": 1, "adapter": str(Path(adapter_dir).resolve()), "base": merged.spec.to_dict()}
    record["dtype"] = "bitsandbytes 4-bit" if quantize_4bit else dtype

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.float.", dir=output_dir.parent)
    with scratch, atomic_folder(output_dir) as out:
        # with quantize_4bit the float merge is only a step on the way to the 4-bit folder
        folder = Path(scratch.name) if quantize_4bit else out
        save_merged(merged.model, merged.tokenizer, folder, DTYPES[dtype])
        merged.model = None
        if check:
            report.tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
            check_merged(folder, merged.samples, merged.reference_logits, report, log)
        if quantize_4bit:
            s = merged.spec
            requant = load_model(
                folder, quant_type=s.quant_type, blocksize=s.blocksize, double_quant=s.double_quant
            )
            requant.tokenizer.chat_template = merged.tokenizer.chat_template
            save_quantized(requant.model, requant.tokenizer, out, overwrite=True)
        record["files"] = sorted(p.name for p in out.iterdir())
        write_json(out / MERGE_RECORD, record)
    log(
        f"merged {report.merged_modules} adapted layers into {output_dir} "
        f"({'bitsandbytes 4-bit' if quantize_4bit else dtype})"
    )
    return report


def check_output(folder: Path, overwrite: bool = False) -> None:
    """Refuse an --output that holds anything but a previous cura merge, and that one without `overwrite`
    (it is replaced whole), before anything is loaded (`cura.atomic.check_replaceable`)."""
    check_replaceable(
        folder, marker=MERGE_RECORD, what="the merged model", overwrite=overwrite, example="./merged"
    )


def check_merged(folder: Path, samples, ref_logits, report: MergeReport, log=print) -> None:
    """Load `folder` with plain transformers and compare with the reference logits; CuraError on drift."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    got, report.perplexity_merged = logits_and_perplexity(merged, samples)
    report.max_abs_logit_diff = max((a - b).abs().max().item() for a, b in zip(got, ref_logits))
    log(
        f"parity vs adapter on base: max |logit diff| {report.max_abs_logit_diff:.3g} "
        f"(tolerance {report.tolerance:g} for {report.dtype}), perplexity {report.perplexity_adapter:.4f} -> "
        f"{report.perplexity_merged:.4f} (diff {report.perplexity_merged - report.perplexity_adapter:+.4f})"
    )
    if not report.max_abs_logit_diff <= report.tolerance:
        raise CuraError(
            f"the merged model's logits differ from the adapter on its base by {report.max_abs_logit_diff:.3g}, "
            f"above the tolerance {report.tolerance:g} for --dtype {report.dtype}; nothing was written to "
            f"{report.output} (check that --model is the base the adapter was trained on, or pass --tolerance)"
        )


def verify_merge(
    model_source, adapter_dir, merged_dir, *, tolerance: float | None = None, log=print
) -> MergeReport:
    """Re-run the parity check of `merge` on an existing merged folder (CuraError on drift)."""
    merged_dir = Path(merged_dir)
    base = load_reference(model_source, adapter_dir, log)
    samples = sample_ids(base.tokenizer, getattr(base.tokenizer, "chat_template", None))
    ref_logits, ppl = logits_and_perplexity(base.model, samples)

    dtype = json.loads((merged_dir / "config.json").read_text()).get("dtype") or DEFAULT_DTYPE
    dtype = dtype if dtype in DTYPES else DEFAULT_DTYPE
    report = MergeReport(merged_dir, dtype, len(lora_layers(base.model)), perplexity_adapter=ppl)
    report.tolerance = TOLERANCES[dtype] if tolerance is None else tolerance
    check_merged(merged_dir, samples, ref_logits, report, log)
    return report
