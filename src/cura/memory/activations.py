"""The step's transient terms: what autograd saves per layer, hidden states, the chunked loss's buffers,
backward's working buffers, the optimizer's working copies, and the framework's overhead.

Formulas over `ModelShape` and `PlanSpec`, each checked against what torch really holds in
tests/test_memory.py; assembled by `cura.memory.planner.plan`.
"""

from __future__ import annotations

import math

from cura.memory.allocator import POOL_HEADROOM, pool_headroom
from cura.memory.shapes import ModelShape
from cura.memory.spec import PlanSpec, Term
from cura.memory.weights import layer_trained_sizes, lora_targets, trained_sizes

INDEX_BYTES = 8  # int64 indices
MIB = 2**20


# ---------------------------------------------------------------------------------------- activations


def saves_input(name: str, targets: tuple[str, ...], spec: PlanSpec) -> bool:
    """Whether a linear keeps its input for backward: a LoRA target without dropout (lora_A saves x), or a
    trained weight (full fine-tuning). A frozen base (nn.Linear or Linear4bit) needs only its weight."""
    return spec.method == "full" or (name in targets and spec.lora_dropout == 0)


def dropout_mask_bytes(spec: PlanSpec) -> int:
    """Bytes per element of a dropout mask kept for backward: a bool on CUDA (`native_dropout`), none on
    CPU, where `cura.nn.dropout` regenerates the mask from its seed in backward."""
    return 1 if spec.device == "cuda" else 0


# The linears of a layer grouped by their shared input, in execution order: q/k/v read the first norm's
# output, o_proj the attention output, gate/up the second norm's output, down_proj SiLU(gate) * up.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def shares_input(k: int, chosen: list[str], spec: PlanSpec) -> bool:
    """Whether the LoRA targets `chosen` of GROUPS[k] form a `cura.nn.lora.SharedInputGroup` (q/k/v or
    gate/up, two or more of them, with dropout): one dropped input (and mask) for all, one concatenated A."""
    return k in (0, 2) and len(chosen) > 1 and spec.lora_dropout > 0 and spec.method != "full"


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
        for j, name in enumerate(chosen):
            total += spec.lora_r * e
            if spec.lora_dropout > 0 and not (j > 0 and shares_input(k, chosen, spec)):
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
    full fine-tuning (autocast's copies). In float32 compute the cast is the weight itself, except for the
    concatenated A of a SharedInputGroup (`shares_input`), a new tensor in any dtype (in another dtype it
    replaces its members' casts, the same bytes). In the first layer the A of the first recorded targets
    is not kept (their input needs no gradient)."""
    if spec.method == "full":
        return shape.linear_params_per_layer * spec.e if spec.e != 4 else 0
    targets, linears = lora_targets(shape, spec), shape.linears()
    start = first_recorded_group(shape, spec, True) if first_layer else -1
    # a SharedInputGroup's concatenated A is a new tensor even in float32 (not saved where its input
    # needs no gradient: the first recorded group of the first layer)
    concatenated = 0
    for k, group in enumerate(GROUPS):
        chosen = [n for n in group if n in targets]
        if shares_input(k, chosen, spec) and k != start:
            concatenated += sum(spec.lora_r * linears[n][0] for n in chosen)
    if spec.e == 4:
        return concatenated * 4
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
    mask = 4 * spec.rows * spec.seq_len**2 if spec.packing else 0
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
    """Peak of one loss chunk, c = min(loss_chunk_tokens, N') positions at a time (`cura.train.steps`).

    The summed next-token loss through a frozen output layer (LoRA, QLoRA) makes the chunk's gradient in its
    forward, in place in the float32 logits (`_fused_chunk_loss`): c * V * 4, plus the head's own (c, V)
    output in e when e != 4 (it takes the cast gradient back). With a trained one (full fine-tuning), and
    for a preference objective's per-token log-probabilities (`cura.train.preference`), the chunk's
    checkpointed recompute runs autograd's cross-entropy: the float32 log-softmax (c, V) it saves, the
    gradient arriving at it and the gradient it passes to the logits: 3 * c * V * 4. The full (N', V)
    logits never exist. A soft-capped head (Gemma 2) holds one more (c, V) float32 buffer (its tanh), not
    counted here."""
    c_v = spec.chunk * shape.vocab_size
    if spec.method != "full" and spec.sft_loss:
        return c_v * 4 + (c_v * spec.e if spec.e != 4 else 0)
    return 3 * c_v * 4


def loss_grad_buffer(shape: ModelShape, spec: PlanSpec) -> int:
    """The gradient of the gathered hidden states, (N', H) in e, where it is alive at the loss peak. With a
    frozen output layer (LoRA, QLoRA) each chunk's forward keeps its own rows of it (`_HeadLoss`), so the
    chunks before the last hold (N' - c) rows; with a trained one (full fine-tuning) the loss backward
    accumulates all of it, alive at the peak when there is more than one chunk."""
    n, row = spec.trained_tokens, shape.hidden_size * spec.e
    if spec.method != "full":
        return (n - spec.chunk) * row
    return n * row if math.ceil(n / spec.chunk) > 1 else 0


def _cpu_qlora(spec: PlanSpec) -> bool:
    """A 4-bit base decoded on a CPU: `Linear4bit`'s scratch buffer and recompute-kept copies exist."""
    return spec.method == "qlora" and spec.device != "cuda"


def dequantized_bytes(n: int, spec: PlanSpec) -> int:
    """The transient full-precision copy of an n-element 4-bit weight that `Linear4bit` makes for one matmul
    on CUDA, where the Triton kernel writes e directly (`cura.quant.triton_kernels`): n * e. On a CPU the copy
    goes into the step-long scratch buffer (`dequant_scratch`) instead: 0 here; 0 without QLoRA."""
    if spec.method != "qlora" or spec.device != "cuda":
        return 0
    return n * spec.e


def dequant_scratch(shape: ModelShape, spec: PlanSpec) -> Term:
    """CPU QLoRA: the scratch buffer every 4-bit matmul dequantizes into (`cura.nn.linear4bit.
    dequantize_for_matmul`), grown to the largest decoder linear in e on the first forward and kept for the
    run, so persistent: max(in * out) * e. One per thread that runs a step (the training thread; autograd's
    CPU backward runs on it too). 0 on CUDA and without QLoRA."""
    name = "dequantize scratch"
    if not _cpu_qlora(spec):
        return Term(name, 0, "none (no 4-bit base on a CPU)")
    n = max(a * b for a, b in shape.linears().values())
    return Term(
        name, n * spec.e, f"largest 4-bit linear ({n / 1e6:.3g}M) x {spec.e} B, reused by every matmul"
    )


def recomputed_weights_bytes(shape: ModelShape, spec: PlanSpec) -> int:
    """CPU QLoRA under checkpointing: the dequantized copies a layer's recompute keeps for its backward
    (`cura.nn.linear4bit._recomputed`), each alive from the recompute until its own matmul's backward: every
    4-bit linear of the layer in e, sum(in * out) * e, but down_proj where the family adds it straight onto
    the residual stream (`residual_mlp_output`: its recompute skips the matmul and keeps nothing). 0 on
    CUDA, without checkpointing and without QLoRA."""
    if not (_cpu_qlora(spec) and spec.gradient_checkpointing):
        return 0
    skipped = shape.intermediate_size * shape.hidden_size if shape.residual_mlp_output else 0
    return (shape.linear_params_per_layer - skipped) * spec.e


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

    On a CPU the recompute's dequantized copies of the layer's weights (`recomputed_weights_bytes`) are
    alive at R and A, and all but down_proj's at B (none of down_proj's where its recompute skips the matmul;
    the scratch buffer is a persistent term, `dequant_scratch`).
    """
    n, e = spec.tokens, spec.e
    i, h = shape.intermediate_size, shape.hidden_size
    targets = lora_targets(shape, spec)
    weight = dequantized_bytes(i * h, spec)
    kept = recomputed_weights_bytes(shape, spec)
    lora_saved = 0  # what down_proj's LoRA path saves for its input
    if "down_proj" in targets:
        lora_saved = n * spec.lora_r * e
        lora_saved += n * i * (dropout_mask_bytes(spec) + e) if spec.lora_dropout > 0 else n * i * e
    product = 0 if saves_input("down_proj", targets, spec) else n * i * e
    kept_after_down = kept - (i * h * e if kept and not shape.residual_mlp_output else 0)
    moments = [
        -lora_saved + 2 * n * i * e + weight + kept,  # A
        -lora_saved + 3 * n * i * e + kept_after_down,  # B
    ]
    if spec.gradient_checkpointing:
        moments += [
            product + 2 * n * h * e + kept,
            -lora_saved + product + weight + n * h * e + kept,
        ]  # R
    return n * h * e + max(moments)


def update_buffers(shape: ModelShape, spec: PlanSpec) -> int:
    """The optimizer's working copies for its largest tensor: the AdamW denominator (n * bytes), and for
    8-bit state the two dequantized float32 moments plus the quantizer's float32 copy, scaled values and
    int64 indices (`cura.optim.state8bit`): about 28 bytes per element."""
    sizes = trained_sizes(shape, spec)
    largest = max(sizes) if sizes else 0
    return largest * (28 if spec.eight_bit else spec.param_bytes)


ALL_REDUCE_BUCKET_BYTES = 25 * 2**20
"""Data parallel: the gradients are summed across processes in flat buffers of at most this size (one tensor
larger than it travels alone); `cura.train.distributed` reduces with it, as DDP's default bucket of 25 MiB."""


def all_reduce_buffers(shape: ModelShape, spec: PlanSpec) -> int:
    """Data parallel (world_size > 1): after backward every gradient is alive and copied into one flat
    bucket at a time for the all-reduce (`cura.train.distributed.World.all_reduce_grads`): the larger of
    min(all gradients, the bucket size) and the largest gradient. The backend's own scratch (gloo's ring
    chunks, NCCL's channel buffers, allocated outside PyTorch's allocator on a GPU) is not counted."""
    if spec.world_size <= 1:
        return 0
    sizes = trained_sizes(shape, spec)
    if not sizes:
        return 0
    every = sum(sizes) * spec.param_bytes
    return max(min(every, ALL_REDUCE_BUCKET_BYTES), max(sizes) * spec.param_bytes)


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
"""CUDA: the context (the driver's state, the loaded kernels of torch, cuBLAS and Triton, cuBLAS/cuDNN handles)
that `torch.cuda.max_memory_allocated` does not count but the card must hold. Source: PyTorch's CUDA
semantics notes and what `nvidia-smi` shows for a process that only did `torch.cuda.init()`: 300-600 MiB on
recent GPUs and drivers with lazy module loading (CUDA >= 11.7). An estimate, not a measurement: no GPU was
available when it was written; bench/train_gpu.py measures it (`nvidia-smi`-free: mem_get_info before and
after init) and records the value to replace it with."""

CUDA_ALLOCATOR_FRACTION = 0.05
"""CUDA: caching-allocator slack (`memory_reserved - memory_allocated` at the peak: blocks split and cached
for reuse), as a fraction of allocated bytes. Source: PyTorch's caching-allocator design (blocks rounded to
512 B, 2 MiB segments for small and 20 MiB for large requests) and the 3-8% gap commonly reported for
transformer training; an estimate until bench/train_gpu.py's `reserved / allocated` replaces it."""

CUDA_WORKSPACE_BYTES = 32 * 2**20
"""CUDA: cuBLAS' workspace per (handle, stream), which torch allocates through its caching allocator, so it
IS counted by `max_memory_allocated`: 32 MiB on Hopper (sm_90) and 4 MiB x 2 + 16 KiB x 8 on older GPUs
(PyTorch's `CUBLAS_WORKSPACE_CONFIG` notes, `getChosenWorkspaceSize` in ATen's CublasHandlePool). The
Triton kernels need no workspace (W's tile lives in registers). Estimate until measured on a GPU."""


def cuda_uncounted_bytes(allocated: int) -> int:
    """What the CUDA overhead term adds beyond `max_memory_allocated` (the context and the allocator's
    slack): the benchmark subtracts it from a plan to compare with a measured peak."""
    return CUDA_CONTEXT_BYTES + int(CUDA_ALLOCATOR_FRACTION * allocated)


def allocator_headroom(spec: PlanSpec, tensors: int) -> Term:
    """CPU on cura's pool (`spec.cpu_pool`): the cached blocks it may hold beyond the live tensors at the
    peak, `cura.memory.allocator.pool_headroom` of them; 0 elsewhere (glibc with its threshold fixed returns
    freed blocks; CUDA's caching allocator is in the framework overhead)."""
    name = "allocator headroom"
    if not (spec.cpu_pool and spec.device == "cpu"):
        return Term(name, 0, "none")
    return Term(
        name,
        pool_headroom(tensors),
        f"cura's CPU pool: freed blocks kept for the next step, up to {POOL_HEADROOM:.0%} of the tensors",
    )


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
    return Term(
        "framework overhead",
        cuda_uncounted_bytes(allocated) + CUDA_WORKSPACE_BYTES,
        f"CUDA context ~{CUDA_CONTEXT_BYTES >> 20} MiB + {CUDA_ALLOCATOR_FRACTION:.0%} allocator slack "
        f"+ cuBLAS workspace {CUDA_WORKSPACE_BYTES >> 20} MiB",
    )
