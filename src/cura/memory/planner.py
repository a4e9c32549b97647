"""The memory plan of one fine-tuning run: named terms in bytes, and the peak they add up to.

    plan(shape, spec) -> MemoryPlan(terms=[Term(name, bytes, formula), ...], peak_phase, host_bytes)

A pure function of the model's shape (`cura.memory.shapes`) and the run's settings (`PlanSpec`, built from a
`TrainConfig` so no default lives here). It models what cura's own training step keeps alive: the loop in
`cura.train.loop.optimizer_step`, the chunked loss in `cura.train.steps.loss_sum`, `Linear4bit` (saves only
the 4-bit weight for backward, dequantizes a transient copy per matmul), `LoRALinear`, transformers' Llama
block under non-reentrant gradient checkpointing, and `PagedAdamW`.

The step has four candidate peaks, each the persistent memory (weights, adapters, optimizer state, framework)
plus what the phase holds:

    loss          saved activations + the loss chunk's logits buffers, backward through the output layer
    last_layer    saved activations + the last decoder layer recomputed (checkpointing) and its gradient
                  buffers + that layer's gradients
    first_layer   the first layer's saved tensors and gradient buffers + every gradient
    update        every gradient + the optimizer's per-tensor working copies

The plan's terms are those alive at the highest of the four (`peak_phase`); each term's function below gives
its formula and where it comes from. Symbols: B batch, T sequence length, N = B*T tokens, N' = B*(T-1)
trained tokens (every label trained: the worst case), L layers, H hidden, I MLP width, V vocabulary,
q = heads*head_dim, kv = kv_heads*head_dim, r LoRA rank, e bytes of the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from cura.errors import CuraError
from cura.memory.shapes import ModelShape

Method = Literal["full", "lora", "qlora"]
Device = Literal["cpu", "cuda"]

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("paged_adamw", "paged_adamw_8bit", "adamw")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ALL_LINEAR = "all-linear"

NESTED_BLOCKSIZE = 256  # double quantization: absmax values quantized in blocks of 256 (cura.quant.tensor)
STATE8_BLOCK = 256  # 8-bit optimizer state: one float32 absmax per 256 values (cura.optim.state8bit)
PAGES_IN_FLIGHT = 3  # PagedAdamW on a GPU: parameters whose state is on the device at once (_IN_FLIGHT + 1)
INDEX_BYTES = 8  # int64 indices
MIB = 2**20


@dataclass(frozen=True)
class PlanSpec:
    """The settings of a run that decide its memory. A run's is built by `cura.train.plan.plan_spec` (so the
    defaults are TrainConfig's).

    `lora_targets` is "all-linear" or module names (q_proj, ..., down_proj); `lora_exclude` names modules that
    get no adapter, matched as `cura.adapters` does (see `layer_targets`). `packing` means batches carry a
    (B, 1, T, T) attention mask (packed rows or padding), which also makes attention repeat K/V heads.
    `device` is "cuda" (GPU memory: what `torch.cuda.max_memory_allocated` counts, plus the CUDA context)
    or "cpu" (the process's resident memory, RSS, with glibc's mmap threshold fixed as `cura train` does with
    cpu_malloc=tight; glibc's default may hold up to FAST_RETENTION times more: `cura.memory.allocator`).
    """

    method: Method
    quant_type: str
    double_quant: bool
    blocksize: int
    lora_r: int
    lora_targets: str | tuple[str, ...]
    lora_dropout: float
    optimizer: str
    compute_dtype: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    loss_chunk_tokens: int
    packing: bool
    device: Device
    lora_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("method", self.method in METHODS, ", ".join(METHODS)),
            ("optimizer", self.optimizer in OPTIMIZERS, ", ".join(OPTIMIZERS)),
            ("compute_dtype", self.compute_dtype in DTYPE_BYTES, ", ".join(DTYPE_BYTES)),
            ("device", self.device in ("cpu", "cuda"), "cpu, cuda"),
            ("quant_type", self.quant_type in ("nf4", "fp4"), "nf4, fp4"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise CuraError(f"planner setting '{key}' is {getattr(self, key)!r}; use one of {allowed}")
        for key in ("batch_size", "seq_len", "lora_r", "loss_chunk_tokens", "blocksize"):
            if getattr(self, key) < 1:
                raise CuraError(f"planner setting '{key}' must be at least 1, got {getattr(self, key)}")
        if self.seq_len < 2:
            raise CuraError(f"planner setting 'seq_len' must be at least 2 tokens, got {self.seq_len}")

    @property
    def e(self) -> int:
        """Bytes per element of the compute dtype (activations, non-quantized parameters, LoRA's casts)."""
        return DTYPE_BYTES[self.compute_dtype]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def trained_tokens(self) -> int:
        return self.batch_size * (self.seq_len - 1)

    @property
    def chunk(self) -> int:
        return min(self.loss_chunk_tokens, self.trained_tokens)

    @property
    def param_bytes(self) -> int:
        """Bytes per trained parameter: 4. LoRA weights are float32 master weights whatever the compute dtype
        (`cura.nn.lora`: cast to the compute dtype on the fly); full fine-tuning keeps float32 masters too."""
        return 4

    @property
    def eight_bit(self) -> bool:
        return self.optimizer.endswith("_8bit")

    @property
    def paged(self) -> bool:
        return self.optimizer.startswith("paged")


@dataclass(frozen=True)
class Term:
    """One named amount of memory with the formula that produced it, filled in with this run's numbers."""

    name: str
    bytes: int
    formula: str


@dataclass(frozen=True)
class MemoryPlan:
    """The terms alive at the peak, their sum (`peak_bytes`) and which phase of the step that peak is in.

    `phases` gives each candidate phase's total; `host_bytes` is what stays in host memory (paged optimizer
    state on a GPU) and is not part of the device peak.
    """

    shape: ModelShape
    spec: PlanSpec
    terms: tuple[Term, ...]
    peak_phase: str
    phases: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)

    def fits(self, budget_bytes: int) -> bool:
        return self.peak_bytes <= budget_bytes


# ------------------------------------------------------------------------------------- which linears


ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def linear_path(layer: int, name: str) -> str:
    """The module path of a decoder linear in a Llama-layout model ("model.layers.3.self_attn.q_proj")."""
    return f"model.layers.{layer}.{'self_attn' if name in ATTENTION_LINEARS else 'mlp'}.{name}"


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    """`cura.adapters`' rule: a pattern matches a module whose path equals it or ends in "." + pattern."""
    return any(path == p or path.endswith("." + p) for p in patterns)


@cache
def _targets_per_layer(
    names: tuple[str, ...], layers: int, targets: str | tuple[str, ...], exclude: tuple[str, ...]
) -> tuple[tuple[str, ...], ...]:
    chosen = []
    for layer in range(layers):
        paths = {n: linear_path(layer, n) for n in names}
        wanted = names if targets == ALL_LINEAR else [n for n in names if _matches(paths[n], targets)]
        chosen.append(tuple(n for n in wanted if not _matches(paths[n], exclude)))
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
        return blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 256 * 4 + 16 * 4
    return 4 * blocks + 16 * 4


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
        return sum(2 * (n + 4 * math.ceil(n / STATE8_BLOCK)) + 4 for n in sizes)
    return sum(2 * n * spec.param_bytes + 4 for n in sizes)


def optimizer_state(shape: ModelShape, spec: PlanSpec) -> tuple[Term, int]:
    """(the device's share of the optimizer state, the host's share).

    On a GPU, `PagedAdamW` keeps the state in (pinned) host memory and pages at most PAGES_IN_FLIGHT
    parameters' moments onto the device per update (`cura.optim.paged_adamw`, QLoRA's paged optimizer);
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


# ---------------------------------------------------------------------------------------- activations


def saves_input(name: str, targets: tuple[str, ...], spec: PlanSpec) -> bool:
    """Whether a linear keeps its input for backward: a LoRA target without dropout (lora_A saves x), or a
    trained weight (full fine-tuning). A frozen base (nn.Linear or Linear4bit) needs only its weight."""
    return spec.method == "full" or (name in targets and spec.lora_dropout == 0)


def dropout_mask_bytes(spec: PlanSpec) -> int:
    """Bytes per element of a dropout mask: a bool on CUDA (`native_dropout`), a float noise tensor in the
    input's dtype on CPU (`at::dropout`'s `input * noise` path)."""
    return 1 if spec.device == "cuda" else spec.e


# The linears of a layer grouped by their shared input, in execution order: q/k/v read the first norm's
# output, o_proj the attention output, gate/up the second norm's output, down_proj SiLU(gate) * up.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def first_recorded_group(shape: ModelShape, spec: PlanSpec, first_layer: bool) -> int:
    """Index in GROUPS of the first linears whose output requires grad. In the first layer under LoRA the
    input comes from a frozen embedding, so autograd records nothing before the first LoRA target."""
    if not first_layer or spec.method == "full":
        return 0
    targets = lora_targets(shape, spec)
    return next(k for k, group in enumerate(GROUPS) if any(n in targets for n in group))


def layer_saved_per_token(shape: ModelShape, spec: PlanSpec, first_layer: bool = False) -> int:
    """Bytes one decoder layer saves for backward per token, beyond its input (the checkpoint).

    Counted from what autograd saves in transformers' Llama block with cura's layers (checked against
    saved-tensor hooks in tests/test_memory.py), in execution order:

        RMSNorm 1       4 (rsqrt) [+ 4H float32 copy of the input when e != 4]
        group inputs    the norms' outputs (H*e) and SiLU(gate)*up (I*e), when a consumer saves its
                        input (`saves_input`); the attention output is saved by attention anyway
        LoRA            r*e (A's output) per target; with dropout also in*(mask + e) (mask, dropped x)
        attention       q*e (rotated queries) + 2*kv*e (keys, values; q*e each when a mask makes SDPA
                        repeat K/V heads) + q*e (output) + 4*heads (logsumexp; flash / efficient kernels)
        RMSNorm 2       4 + 4H (the residual sum, or its float32 copy)
        MLP             3*I*e (gate, SiLU(gate), up)
        full FT         + 2*H*e (the normalised inputs kept for the norm weights' gradients)

    `first_layer`: the first layer under LoRA, where nothing before the first LoRA targets is recorded and
    their dropout masks are not either (their input does not require grad). Exact when the targets include
    q/k/v or whole groups (checked in the tests); approximate (high) for partial MLP targets there.
    """
    e, h, i = spec.e, shape.hidden_size, shape.intermediate_size
    targets, linears = lora_targets(shape, spec), shape.linears()
    start = first_recorded_group(shape, spec, first_layer)
    kv = shape.q_dim if (spec.packing and shape.num_kv_heads < shape.num_heads) else shape.kv_dim
    group_inputs = (h * e, shape.q_dim * e, h * e, i * e)
    no_dropout = spec.lora_dropout == 0 or spec.method == "full"
    input_recorded = not first_layer or spec.method == "full"
    total = 4 + (4 * h if e != 4 else 0) if input_recorded else 0  # RMSNorm 1
    for k, group in enumerate(GROUPS[start:], start):
        recorded_input = k > start or input_recorded
        chosen = [n for n in group if n in targets]
        keeps_input = any(saves_input(n, targets, spec) for n in group)
        if keeps_input and no_dropout and not (k == 1 and start == 0):  # attention keeps o_proj's input
            total += group_inputs[k]
        for name in chosen:
            total += spec.lora_r * e
            if spec.lora_dropout > 0:
                mask = dropout_mask_bytes(spec) if recorded_input else 0
                total += linears[name][0] * (mask + e)
        if k == 0:
            total += shape.q_dim * e + 2 * kv * e + shape.q_dim * e + 4 * shape.num_heads  # attention
        if k == 1:
            total += 4 + 4 * h  # RMSNorm 2
        if k == 2:
            total += 3 * i * e  # gate, SiLU(gate), up
    if spec.method == "full":
        total += 2 * h * e
    return total


def weight_casts_per_layer(shape: ModelShape, spec: PlanSpec, first_layer: bool = False) -> int:
    """Compute-dtype copies of trained float32 weights that one layer saves for backward when e != 4: LoRA's
    A and B cast on the fly (`cura.nn.lora`), r * (in + out) * e per target, or every linear weight under
    full fine-tuning (autocast's copies). Nothing in float32 compute, where the cast is the weight itself.
    In the first layer the A of the first recorded targets is not kept (their input needs no gradient)."""
    if spec.e == 4:
        return 0
    if spec.method == "full":
        return shape.linear_params_per_layer * spec.e
    total = sum(layer_trained_sizes(shape, spec)) * spec.e
    if first_layer:
        first = [n for n in GROUPS[first_recorded_group(shape, spec, True)] if n in lora_targets(shape, spec)]
        total -= sum(spec.lora_r * shape.linears()[n][0] for n in first) * spec.e
    return total


def hidden_state_bytes(shape: ModelShape, spec: PlanSpec) -> int:
    """Hidden states (N, H) in e kept between layers.

    With checkpointing, every layer's input is kept for its recomputation (transformers'
    `GradientCheckpointingLayer`, non-reentrant): L of them. Without, a layer's input is kept only as what
    its first RMSNorm saves, which is the tensor itself in float32 compute (a float32 copy otherwise,
    counted in `layer_saved_per_token`), and the first layer's input (a frozen embedding's output) is not
    recorded at all under LoRA. The last layer's output is saved by the final norm in float32 compute.
    """
    e, layers = spec.e, shape.num_layers
    if spec.gradient_checkpointing:
        count = layers
    elif e == 4:
        count = layers - (0 if spec.method == "full" else 1)
    else:
        count = 0
    count += 1 if e == 4 else 0
    return count * spec.tokens * shape.hidden_size * e


def step_buffers(shape: ModelShape, spec: PlanSpec) -> int:
    """Tensors shared by all layers for the whole step: the (B, 1, T, T) float32 attention mask of packed
    or padded batches (`cura.data.packing`), rotary cos and sin (B, T, head_dim) in e, the batch's int64
    input ids, labels and position ids."""
    mask = 4 * spec.batch_size * spec.seq_len**2 if spec.packing else 0
    rope = 2 * spec.tokens * shape.head_dim * spec.e
    return mask + rope + 3 * INDEX_BYTES * spec.tokens


def final_norm_and_gather(shape: ModelShape, spec: PlanSpec) -> int:
    """What `loss_sum` keeps after the last layer: the final RMSNorm's rsqrt (4 B/token, plus a float32 copy
    of its input when e != 4), the trained positions' hidden states gathered to (N', H) in e, and the int64
    indices of the boolean-mask gather (2 per position) kept for its backward."""
    n, h, e = spec.tokens, shape.hidden_size, spec.e
    norm = 4 * n + (4 * n * h if e != 4 else 0)
    return norm + spec.trained_tokens * (h * e + 2 * INDEX_BYTES)


def loss_chunk_bytes(shape: ModelShape, spec: PlanSpec) -> int:
    """Peak of one loss chunk's backward: c = min(loss_chunk_tokens, N') positions at a time, under
    activation checkpointing (`cura.train.steps`): the recomputed float32 log-softmax (c, V) saved by
    cross-entropy, the gradient arriving at it and the gradient it passes to the logits: 3 * c * V * 4.
    The full (N', V) logits never exist."""
    return 3 * spec.chunk * shape.vocab_size * 4


def loss_grad_buffer(shape: ModelShape, spec: PlanSpec) -> int:
    """The gradient of the gathered hidden states, (N', H) in e, accumulated chunk by chunk while the loss
    backward runs; alive at the loss peak when there is more than one chunk."""
    chunks = math.ceil(spec.trained_tokens / spec.chunk)
    return spec.trained_tokens * shape.hidden_size * spec.e if chunks > 1 else 0


def dequantized_bytes(n: int, spec: PlanSpec) -> int:
    """The transient full-precision copy of an n-element 4-bit weight that `Linear4bit` makes for one matmul
    (float32, then cast to e where e != 4): n * (4 + e) bytes, n * 4 in float32 compute; 0 without QLoRA."""
    if spec.method != "qlora":
        return 0
    return n * (4 + (spec.e if spec.e != 4 else 0))


def layer_backward_buffers(shape: ModelShape, spec: PlanSpec) -> int:
    """Buffers beyond the layer's saved tensors at the peak of backward through one decoder layer.

    The widest tensors are in the MLP, so the peak is at one of three moments (traced with the torch
    profiler's memory events on tiny models, see bench/memory.py), with the gradient arriving at the layer
    (N*H*e) alive throughout:

        R  (checkpointing) the recompute reaches down_proj: its input, the product SiLU(gate)*up, is alive
           (N*I*e, when no LoRA path keeps it anyway), with down_proj's output and the residual branch's
           gradient (2 * N*H*e); in QLoRA the dequantized weight, before the LoRA path saves its tensors
        A  down_proj's backward: what its LoRA path saved is freed; the base and LoRA input gradients
           (2 * N*I*e) and the dequantized weight are alive
        B  the product's backward (or A's accumulation of the two gradients into a third): 3 * N*I*e
    """
    n, e = spec.tokens, spec.e
    i, h = shape.intermediate_size, shape.hidden_size
    targets = lora_targets(shape, spec)
    weight = dequantized_bytes(i * h, spec)
    lora_saved = 0  # what down_proj's LoRA path saves for its input
    if "down_proj" in targets:
        lora_saved = n * spec.lora_r * e
        lora_saved += n * i * (dropout_mask_bytes(spec) + e) if spec.lora_dropout > 0 else n * i * e
    product = 0 if saves_input("down_proj", targets, spec) else n * i * e
    moments = [
        -lora_saved + 2 * n * i * e + weight,  # A
        -lora_saved + 3 * n * i * e,  # B
    ]
    if spec.gradient_checkpointing:
        moments += [product + 2 * n * h * e, -lora_saved + product + weight + n * h * e]  # R
    return n * h * e + max(moments)


def update_buffers(shape: ModelShape, spec: PlanSpec) -> int:
    """The optimizer's working copies for its largest tensor: the AdamW denominator (n * bytes), and for
    8-bit state the two dequantized float32 moments plus the quantizer's float32 copy, scaled values and
    int64 indices (`cura.optim.state8bit`): about 28 bytes per element."""
    sizes = trained_sizes(shape, spec)
    largest = max(sizes) if sizes else 0
    return largest * (28 if spec.eight_bit else spec.param_bytes)


# ------------------------------------------------------------------------------------------ overhead

CPU_BASE_BYTES = {4: 33 * MIB, 2: 51 * MIB}
"""CPU, by bytes of the compute dtype: resident memory a training process adds beyond its tensors, from
`import torch, transformers` to the peak of a step, for a 2-layer model: library code paged in on first use
(~25 MiB of file-backed pages), OpenMP thread stacks, MKL / oneDNN buffers (bfloat16 matmuls use oneDNN, with
more code and scratch: +18 MiB), the NF4 decoding table (1 MiB), Python objects. Calibrated by
bench/memory.py on tiny models, where it was the same within 3 MiB for hidden sizes 64-512, vocabularies
320-32000 and 128-4096 tokens per step (bench/results/memory.json)."""

CPU_PER_LAYER_BYTES = int(0.7 * MIB)
"""CPU: resident memory per decoder layer beyond its tensors: the modules' Python objects (~0.1 MiB) and the
step's autograd graph nodes, saved-variable records and checkpoint frames. Measured: 2 vs 16 layers of the
same width added 10 MiB (bench/memory.py)."""

CUDA_CONTEXT_BYTES = 500 * 2**20
"""CUDA: the context (kernels, cuBLAS/cuDNN handles and workspaces) that `torch.cuda.max_memory_allocated`
does not count but the card must hold; 300-600 MiB on recent GPUs and drivers (PyTorch's CUDA semantics notes).
Not measured here: no GPU was available when this was written."""

CUDA_ALLOCATOR_FRACTION = 0.05
"""CUDA: caching-allocator fragmentation (reserved minus allocated), as a fraction of allocated bytes."""


def framework_overhead(shape: ModelShape, spec: PlanSpec, allocated: int) -> Term:
    """CPU: CPU_BASE_BYTES[e] + L * CPU_PER_LAYER_BYTES, measured (glibc's mmap threshold fixed, see
    `cura.memory.allocator`). CUDA: the context plus allocator fragmentation on the allocated bytes."""
    if spec.device == "cpu":
        n = CPU_BASE_BYTES[spec.e] + shape.num_layers * CPU_PER_LAYER_BYTES
        return Term(
            "framework overhead",
            n,
            f"measured on this kind of machine: RSS beyond tensors ({shape.num_layers} layers)",
        )
    slack = int(CUDA_ALLOCATOR_FRACTION * allocated)
    return Term(
        "framework overhead",
        CUDA_CONTEXT_BYTES + slack,
        f"CUDA context ~{CUDA_CONTEXT_BYTES >> 20} MiB + {CUDA_ALLOCATOR_FRACTION:.0%} allocator slack",
    )


# ---------------------------------------------------------------------------------------------- plan


def _activation_phases(shape: ModelShape, spec: PlanSpec) -> dict[str, dict[str, int]]:
    """Per phase: bytes of saved activations, loss buffers and working buffers alive at its peak.

    Backward frees each layer's hidden states and saved tensors as it allocates its gradients, so besides
    the loss it peaks either at the last layer (every hidden state alive, one layer's gradients) or at the
    first (one hidden state, every gradient); the update follows with every gradient and no activation.
    """
    n = spec.tokens
    per_layer = layer_saved_per_token(shape, spec) * n + weight_casts_per_layer(shape, spec)
    first_layer = layer_saved_per_token(shape, spec, True) * n + weight_casts_per_layer(shape, spec, True)
    shared = step_buffers(shape, spec)
    saved = hidden_state_bytes(shape, spec) + shared
    if not spec.gradient_checkpointing:
        saved += (shape.num_layers - 1) * per_layer + first_layer
    recomputed = per_layer if spec.gradient_checkpointing else 0
    first_input = n * shape.hidden_size * spec.e if spec.gradient_checkpointing else 0
    buffers = layer_backward_buffers(shape, spec)
    return {
        "loss": {
            "activations": saved + final_norm_and_gather(shape, spec),
            "logits and loss": loss_chunk_bytes(shape, spec) + loss_grad_buffer(shape, spec),
            "working buffers": 0,
        },
        "last_layer": {"activations": saved + recomputed, "logits and loss": 0, "working buffers": buffers},
        "first_layer": {
            "activations": shared + first_input + first_layer,
            "logits and loss": 0,
            "working buffers": buffers,
        },
        "update": {"activations": 0, "logits and loss": 0, "working buffers": update_buffers(shape, spec)},
    }


_ACTIVATION_FORMULAS: dict[str, Callable[[ModelShape, PlanSpec, str], str]] = {
    "activations": lambda s, p, ph: {
        "loss": f"{s.num_layers + 1} hidden states of {p.batch_size}x{p.seq_len}x{s.hidden_size}"
        + ("" if p.gradient_checkpointing else " + every layer's saved tensors"),
        "last_layer": f"{s.num_layers + 1} hidden states of {p.batch_size}x{p.seq_len}x{s.hidden_size}"
        + (" + one layer recomputed" if p.gradient_checkpointing else " + every layer's saved tensors"),
        "first_layer": "the first layer's saved tensors",
        "update": "freed before the update",
    }[ph],
    "logits and loss": lambda s, p, ph: (
        f"3 x {p.chunk} tokens x {s.vocab_size} vocab x 4 B (chunked loss)" if ph == "loss" else "not at peak"
    ),
    "working buffers": lambda s, p, ph: {
        "loss": "none at this peak",
        "last_layer": "gradient buffers of one layer's MLP backward",
        "first_layer": "gradient buffers of one layer's MLP backward",
        "update": "optimizer working copies",
    }[ph],
}


def plan(shape: ModelShape, spec: PlanSpec) -> MemoryPlan:
    """The memory plan of a run: persistent terms + the gradients and activation terms of the highest phase."""
    persistent = [
        quantized_weights(shape, spec),
        quantization_constants(shape, spec),
        full_precision_linears(shape, spec),
        other_parameters(shape, spec),
        adapters(shape, spec),
    ]
    state, host = optimizer_state(shape, spec)
    base = sum(t.bytes for t in persistent) + state.bytes
    phases = _activation_phases(shape, spec)
    grads = {name: gradients(shape, spec, name) for name in phases}
    totals = {name: base + grads[name].bytes + sum(parts.values()) for name, parts in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    dynamic = [Term(k, v, _ACTIVATION_FORMULAS[k](shape, spec, peak)) for k, v in phases[peak].items()]
    overhead = framework_overhead(shape, spec, totals[peak])
    terms = (*persistent, grads[peak], state, *dynamic, overhead)
    return MemoryPlan(
        shape=shape,
        spec=spec,
        terms=terms,
        peak_phase=peak,
        phases={k: v + overhead.bytes for k, v in totals.items()},
        host_bytes=host,
    )
