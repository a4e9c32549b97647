"""The persistent terms of a plan: which linears carry an adapter, the base weights (4-bit codes and their
constants, or full precision), the other parameters, the adapters, their gradients and the optimizer state.

Formulas over `ModelShape` and `PlanSpec`; each function's docstring gives its source. Assembled by
`cura.memory.planner.plan`.
"""

from __future__ import annotations

import math
from functools import cache

from cura.constants import ALL_LINEAR, DYNAMIC_MAP_SIZE, NESTED_BLOCKSIZE, STATE8_BLOCKSIZE
from cura.errors import CuraError
from cura.memory.shapes import ModelShape
from cura.memory.spec import PlanSpec, Term
from cura.nn.select import matches

CODE_4BIT_SIZE = 16  # entries of the NF4 / FP4 code book (4 bits)
PAGES_IN_FLIGHT = 3  # PagedAdamW on a GPU: parameters whose state is on the device at once (_IN_FLIGHT + 1)


# ------------------------------------------------------------------------------------- which linears


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def linear_path(layer: int, name: str) -> str:
    """The module path of a decoder linear in a Llama-layout model ("model.layers.3.self_attn.q_proj")."""
    return f"model.layers.{layer}.{'self_attn' if name in ATTENTION_LINEARS else 'mlp'}.{name}"


@cache
def _targets_per_layer(
    names: tuple[str, ...], layers: int, targets: str | tuple[str, ...], exclude: tuple[str, ...]
) -> tuple[tuple[str, ...], ...]:
    chosen = []
    for layer in range(layers):
        paths = {n: linear_path(layer, n) for n in names}
        wanted = names if targets == ALL_LINEAR else [n for n in names if matches(paths[n], targets)]
        chosen.append(tuple(n for n in wanted if not matches(paths[n], exclude)))
    return tuple(chosen)


def layer_targets(shape: ModelShape, spec: PlanSpec) -> tuple[tuple[str, ...], ...]:
    """Per decoder layer, the linears that get an adapter, as `cura.adapters.select_targets` picks them:
    every one for "all-linear" (lm_head is never a target), else those matching `lora_targets`; minus those
    matching `lora_exclude` ("o_proj", "mlp.down_proj", or one layer's "layers.0.self_attn.q_proj"). None
    for full fine-tuning."""
    if spec.method == "full":
        return ((),) * shape.num_layers
    names = tuple(shape.linears())
    chosen = _targets_per_layer(names, shape.num_layers, spec.lora_targets, spec.lora_exclude)
    if not any(chosen):
        asked = spec.lora_targets if spec.lora_targets == ALL_LINEAR else list(spec.lora_targets)
        raise CuraError(
            f"LoRA targets {asked} (excluding {list(spec.lora_exclude)}) match no linear layer of "
            f"{shape.name}; use 'all-linear' or names among {', '.join(names)}"
        )
    return chosen


def lora_targets(shape: ModelShape, spec: PlanSpec) -> tuple[str, ...]:
    """The linears with an adapter in some layer, in layer order: what the activation terms assume of every
    layer (exact when the exclusions name no single layer; an upper bound otherwise)."""
    if spec.method == "full":
        return ()
    chosen = set().union(*layer_targets(shape, spec))
    return tuple(n for n in shape.linears() if n in chosen)


def layer_trained_sizes(shape: ModelShape, spec: PlanSpec, layer: int | None = None) -> list[int]:
    """Elements of each trained tensor of decoder layer `layer` (default: the last, whose backward comes
    first): A (r x in) and B (out x r) per LoRA target; every weight, norm and bias of the layer under full
    fine-tuning."""
    linears = shape.linears()
    if spec.method == "full":
        sizes = [a * b for a, b in linears.values()] + [shape.hidden_size] * 2
        return sizes + ([shape.q_dim, shape.kv_dim, shape.kv_dim] if shape.attention_bias else [])
    sizes = []
    for name in layer_targets(shape, spec)[shape.num_layers - 1 if layer is None else layer]:
        fan_in, fan_out = linears[name]
        sizes += [spec.lora_r * fan_in, fan_out * spec.lora_r]
    return sizes


def trained_sizes(shape: ModelShape, spec: PlanSpec) -> list[int]:
    """Elements of every trained tensor: each layer's, plus (full fine-tuning) the embedding, an untied
    lm_head and the final norm."""
    if spec.method == "full":
        outer = [shape.embedding_params, shape.lm_head_params, shape.hidden_size]
        return layer_trained_sizes(shape, spec) * shape.num_layers + [n for n in outer if n]
    return [n for layer in range(shape.num_layers) for n in layer_trained_sizes(shape, spec, layer)]


# ------------------------------------------------------------------------------------- the weights


def quantized_weights(shape: ModelShape, spec: PlanSpec) -> Term:
    """QLoRA's 4-bit codes of every decoder linear: two per byte, ``ceil(n / 2)`` bytes for n elements.

    Source: DESIGN.md "Packing" (packed shape [ceil(n/2), 1] uint8), `cura.quant.tensor.QuantizedTensor`.
    lm_head stays in full precision (`load_model(skip=("lm_head",))`, as bitsandbytes does).
    """
    if spec.method != "qlora":
        return Term("quantized base weights", 0, "no 4-bit base (method is not qlora)")
    n = sum(math.ceil(a * b / 2) for a, b in shape.linears().values()) * shape.num_layers
    return Term("quantized base weights", n, f"{shape.linear_params / 1e9:.3g}B linear params x 4 bits")


def quant_constants_per_linear(n: int, spec: PlanSpec) -> int:
    """Bytes of one 4-bit weight's constants: absmax per block of `blocksize` plus the code books.

    With double quantization: uint8 absmax per block, float32 nested absmax per 256 blocks, the 256-entry
    float32 nested code (1 KiB) and the 16-entry code (64 B): 4 + 8/64 + 32/(64*256) = 4.127 bits/param
    with the codes. Without: float32 absmax per block (4.5 bits/param) and the 16-entry code.
    Source: DESIGN.md "Double quantization", `QuantizedTensor.nbytes` (each layer holds its own code books).
    """
    blocks = math.ceil(n / spec.blocksize)
    if spec.double_quant:
        return blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + DYNAMIC_MAP_SIZE * 4 + CODE_4BIT_SIZE * 4
    return 4 * blocks + CODE_4BIT_SIZE * 4


def quantization_constants(shape: ModelShape, spec: PlanSpec) -> Term:
    """Sum of `quant_constants_per_linear` over every decoder linear (QLoRA only)."""
    if spec.method != "qlora":
        return Term("quantization constants", 0, "no 4-bit base")
    n = sum(quant_constants_per_linear(a * b, spec) for a, b in shape.linears().values()) * shape.num_layers
    how = "uint8 absmax per block + float32 per 256 blocks" if spec.double_quant else "float32 absmax"
    return Term("quantization constants", n, f"{how} (blocksize {spec.blocksize})")


def full_precision_linears(shape: ModelShape, spec: PlanSpec) -> Term:
    """Decoder linears kept in full precision: LoRA's frozen base in the compute dtype (`load_model` with
    `quantize=False`), full fine-tuning's float32 master weights; 0 for QLoRA (4-bit terms instead)."""
    if spec.method == "qlora":
        return Term("full-precision base weights", 0, "base linears are 4-bit")
    per = spec.param_bytes if spec.method == "full" else spec.e
    return Term(
        "full-precision base weights",
        shape.linear_params * per,
        f"{shape.linear_params / 1e9:.3g}B linear params x {per} B",
    )


def other_parameters(shape: ModelShape, spec: PlanSpec) -> Term:
    """Embeddings, lm_head (none when tied), RMSNorm weights and q/k/v biases, in the compute dtype
    (`load_model` casts every non-quantized tensor to it); float32 master copies for full fine-tuning."""
    per = spec.param_bytes if spec.method == "full" else spec.e
    parts = f"embeddings {shape.embedding_params / 1e6:.1f}M"
    if shape.lm_head_params:
        parts += f" + lm_head {shape.lm_head_params / 1e6:.1f}M"
    return Term(
        "embeddings, lm_head, norms",
        shape.other_params * per,
        f"{parts} + norms/biases {(shape.norm_params + shape.bias_params) / 1e6:.2f}M, x {per} B",
    )


def adapters(shape: ModelShape, spec: PlanSpec) -> Term:
    """LoRA weights: r * (in + out) per target linear per layer, float32 master weights (`cura.nn.lora`).
    Source: Hu et al. 2021 for the shapes."""
    if spec.method == "full":
        return Term("LoRA adapters", 0, "full fine-tuning: no adapters")
    n = sum(trained_sizes(shape, spec))
    per_layer = {len(t) for t in layer_targets(shape, spec)}
    if len(per_layer) == 1:
        where = f"{per_layer.pop()} linears x {shape.num_layers} layers"
    else:
        where = f"{sum(map(len, layer_targets(shape, spec)))} linears in {shape.num_layers} layers"
    return Term(
        "LoRA adapters",
        n * spec.param_bytes,
        f"r={spec.lora_r} on {where}: {n / 1e6:.1f}M x {spec.param_bytes} B",
    )


def gradients(shape: ModelShape, spec: PlanSpec, phase: str) -> Term:
    """Gradients alive at a phase's peak, in the trained parameters' dtype. `zero_grad(set_to_none=True)`
    frees them after every update, so backward allocates them as it goes: none yet in the loss backward
    (except the output layer's under full fine-tuning), one layer's in the last layer's backward, all of
    them by the first layer's backward and at the update."""
    head = shape.embedding_params if spec.method == "full" else 0  # lm_head (or the tied embedding)
    every = sum(trained_sizes(shape, spec))
    n = {
        "loss": head,
        "last_layer": head + sum(layer_trained_sizes(shape, spec)),
        "first_layer": every,
        "update": every,
        "all_reduce": every,
    }[phase]
    where = {"loss": "output layer only", "last_layer": "one layer's"}.get(phase, "all")
    return Term("gradients", n * spec.param_bytes, f"{where}: {n / 1e6:.2f}M params x {spec.param_bytes} B")


def optimizer_state_bytes(sizes: list[int], spec: PlanSpec) -> int:
    """AdamW's two moments per trained tensor plus a float32 step counter.

    32-bit: each moment in the parameter's dtype (`torch.optim.AdamW` and `PagedAdamW` create them with
    `zeros_like(param)`), 2 * n * bytes. 8-bit (`cura.optim.state8bit`, Dettmers et al. 2021): uint8 codes
    plus a float32 absmax per 256 values, 2 * (n + 4 * ceil(n / 256)).
    """
    if spec.eight_bit:
        return sum(2 * (n + 4 * math.ceil(n / STATE8_BLOCKSIZE)) + 4 for n in sizes)
    return sum(2 * n * spec.param_bytes + 4 for n in sizes)


def optimizer_state(shape: ModelShape, spec: PlanSpec) -> tuple[Term, int]:
    """(the device's share of the optimizer state, the host's share).

    On a GPU, `PagedAdamW` needs on the device only PAGES_IN_FLIGHT parameters' moments at a time: the rest
    can live in (pinned) host memory (`cura.optim.paged_adamw`, QLoRA's paged optimizer). This is the
    least it needs, the question "does it fit"; with paging="auto" it keeps the whole state on the device
    while the card has room, so a measured peak on a roomy card includes the host share too.
    torch AdamW keeps it on the device. On a CPU everything is host memory, which is the device.
    """
    sizes = trained_sizes(shape, spec)
    total = optimizer_state_bytes(sizes, spec)
    kind = "8-bit" if spec.eight_bit else f"{spec.param_bytes}-byte"
    if spec.paged and spec.device == "cuda":
        pages = sorted(sizes, reverse=True)[:PAGES_IN_FLIGHT]
        on_device = sum(2 * n * spec.param_bytes for n in pages)
        return Term(
            "optimizer state", on_device, f"paged: {kind} state in host memory, pages in flight"
        ), total
    return Term("optimizer state", total, f"AdamW, 2 {kind} moments x {sum(sizes) / 1e6:.1f}M params"), 0
