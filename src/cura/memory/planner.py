"""The memory plan of one fine-tuning run: named terms in bytes, and the peak they add up to.

    plan(shape, spec) -> MemoryPlan(terms=[Term(name, bytes, formula), ...], peak_phase, host_bytes)

A pure function of the model's shape (`cura.memory.shapes`) and the run's settings (`PlanSpec`, which
`cura.train.plan.plan_spec` builds from a `TrainConfig`, so no default lives here). It models what cura's own training step keeps alive: the loop in
`cura.train.steps.optimizer_step`, the chunked loss in `cura.train.steps.loss_sum`, `Linear4bit` (saves only
the 4-bit weight for backward; on a CPU dequantizes into one reused scratch buffer, and a checkpointed
layer's recompute keeps its copies for that layer's backward), `LoRALinear`, transformers' Llama
block under non-reentrant gradient checkpointing, and `PagedAdamW`.

The step has four candidate peaks, each the persistent memory (weights, adapters, optimizer state, framework)
plus what the phase holds:

    loss          saved activations + the loss chunk's logits buffers, backward through the output layer
    last_layer    saved activations + the last decoder layer recomputed (checkpointing) and its gradient
                  buffers + that layer's gradients
    first_layer   the first layer's saved tensors and gradient buffers + every gradient
    update        every gradient + the optimizer's per-tensor working copies

The plan's terms are those alive at the highest of the four (`peak_phase`); each term's function gives its
formula and where it comes from: the persistent ones in `cura.memory.weights`, the step's in
`cura.memory.activations`; the inputs and outputs are `cura.memory.spec`'s.

Preference objectives (`cura.train.preference`): DPO and ORPO put chosen and rejected through the model in
one batch, so every per-token term counts `rows = B * sequences_per_example` (2) sequences; the output layer
scores them chunk by chunk as the SFT loss does (per-token log-probabilities, no full logits). The reference
forward of DPO/KTO (adapter off, no gradient) runs before the policy's and keeps no activations, so its
transient memory is below the training forward's and adds no term; precomputed reference log-probabilities
(one float per sequence) add nothing either. KTO's mismatched KL rows are a no-gradient forward too. Symbols: B batch, T sequence length, N = B*T tokens, N' = B*(T-1)
trained tokens (every label trained: the worst case), L layers, H hidden, I MLP width, V vocabulary,
q = heads*head_dim, kv = kv_heads*head_dim, r LoRA rank, e bytes of the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

from cura.memory import sharding
from cura.memory.activations import (
    all_reduce_buffers,
    allocator_headroom,
    dequant_scratch,
    final_norm_and_gather,
    first_recorded_group,
    framework_overhead,
    hidden_state_bytes,
    layer_backward_buffers,
    layer_saved_per_token,
    loss_chunk_bytes,
    loss_grad_buffer,
    step_buffers,
    update_buffers,
    weight_casts_per_layer,
)
from cura.memory.shapes import ModelShape
from cura.memory.spec import MemoryPlan, PlanSpec, Term
from cura.memory.weights import (
    adapters,
    full_precision_linears,
    gradients,
    layer_targets,
    layer_trained_sizes,
    lora_targets,
    optimizer_state,
    other_parameters,
    quant_constants_per_linear,
    quantization_constants,
    quantized_weights,
    trained_sizes,
)

__all__ = [  # the terms, importable from here as before the split into weights.py / activations.py
    "all_reduce_buffers",
    "allocator_headroom",
    "MemoryPlan",
    "ModelShape",
    "PlanSpec",
    "Term",
    "adapters",
    "final_norm_and_gather",
    "first_recorded_group",
    "framework_overhead",
    "full_precision_linears",
    "gradients",
    "hidden_state_bytes",
    "layer_backward_buffers",
    "layer_saved_per_token",
    "layer_targets",
    "layer_trained_sizes",
    "lora_targets",
    "loss_chunk_bytes",
    "loss_grad_buffer",
    "optimizer_state",
    "other_parameters",
    "plan",
    "quant_constants_per_linear",
    "quantization_constants",
    "quantized_weights",
    "step_buffers",
    "trained_sizes",
    "update_buffers",
    "weight_casts_per_layer",
]


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
    phases = {
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
    if spec.world_size > 1 and spec.fsdp:  # FSDP2 reduce-scatters each layer's gradients in backward
        phases["first_layer"]["working buffers"] += sharding.reduce_scatter_buffers(shape, spec)
    elif spec.world_size > 1:  # between backward and the update: the gradients' all-reduce across processes
        phases["all_reduce"] = {
            "activations": 0,
            "logits and loss": 0,
            "working buffers": all_reduce_buffers(shape, spec),
        }
    return phases


_ACTIVATION_FORMULAS: dict[str, Callable[[ModelShape, PlanSpec, str], str]] = {
    "activations": lambda s, p, ph: {
        "loss": f"{s.num_layers + 1} hidden states of {p.rows}x{p.seq_len}x{s.hidden_size}"
        + ("" if p.gradient_checkpointing else " + every layer's saved tensors"),
        "last_layer": f"{s.num_layers + 1} hidden states of {p.rows}x{p.seq_len}x{s.hidden_size}"
        + (" + one layer recomputed" if p.gradient_checkpointing else " + every layer's saved tensors"),
        "first_layer": "the first layer's saved tensors",
        "update": "freed before the update",
        "all_reduce": "freed before the all-reduce",
    }[ph],
    "logits and loss": lambda s, p, ph: _loss_formula(s, p) if ph == "loss" else "not at peak",
    "working buffers": lambda s, p, ph: {
        "loss": "none at this peak",
        "last_layer": "gradient buffers of one layer's MLP backward",
        "first_layer": "gradient buffers of one layer's MLP backward",
        "update": "optimizer working copies",
        "all_reduce": "the flat bucket of the gradients' all-reduce across processes",
    }[ph],
}


def _loss_formula(s: ModelShape, p: PlanSpec) -> str:
    """The formula of `loss_chunk_bytes` + `loss_grad_buffer` as the plan shows it."""
    if p.method != "full" and p.sft_loss:  # the gradient in place in the float32 logits (+ the head's own)
        per = "4 B" if p.e == 4 else f"(4 + {p.e}) B"
        chunk = f"{p.chunk} tokens x {s.vocab_size} vocab x {per} (chunked loss, gradient in place)"
    else:
        chunk = f"3 x {p.chunk} tokens x {s.vocab_size} vocab x 4 B (chunked loss)"
    return chunk + " + the hidden-state gradient of the tokens before the last chunk"


def plan(shape: ModelShape, spec: PlanSpec) -> MemoryPlan:
    """The memory plan of a run: persistent terms + the gradients and activation terms of the highest phase."""
    persistent = [
        quantized_weights(shape, spec),
        quantization_constants(shape, spec),
        full_precision_linears(shape, spec),
        other_parameters(shape, spec),
        adapters(shape, spec),
        dequant_scratch(shape, spec),
    ]
    state, host = optimizer_state(shape, spec)
    phases = _activation_phases(shape, spec)
    grads = {name: gradients(shape, spec, name) for name in phases}
    if spec.fsdp and spec.world_size > 1:  # one rank's share (cura.memory.sharding)
        persistent = [sharding.shard_term(t, shape, spec) for t in persistent]
        state, host = sharding.shard_state(state, host, spec)
        grads = {k: sharding.shard_gradients(g, shape, spec, k) for k, g in grads.items()}
    base = sum(t.bytes for t in persistent) + state.bytes
    totals = {name: base + grads[name].bytes + sum(parts.values()) for name, parts in phases.items()}
    peak = max(totals, key=lambda k: totals[k])
    dynamic = [Term(k, v, _ACTIVATION_FORMULAS[k](shape, spec, peak)) for k, v in phases[peak].items()]
    headroom = allocator_headroom(spec, totals[peak])
    overhead = framework_overhead(shape, spec, totals[peak])
    terms = (*persistent, grads[peak], state, *dynamic, headroom, overhead)
    return MemoryPlan(
        shape=shape,
        spec=spec,
        terms=terms,
        peak_phase=peak,
        phases={k: v + allocator_headroom(spec, v).bytes + overhead.bytes for k, v in totals.items()},
        host_bytes=host,
    )
