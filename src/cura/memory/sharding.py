"""The plan of one rank of an `--fsdp` run (`cura.train.fsdp`): the sharded terms divided by the world size,
plus the layers that are all-gathered whole at a time.

    4-bit base, its constants, LoRA weights     / N  + G gathered layers (whole)
    gradients                                    / N  + one layer's (whole, before its reduce-scatter)
    optimizer state                              / N  (each rank steps its own shard)
    embeddings, lm_head, norms                   whole on every rank (FSDP ignores them in cura)

G = 1 on a CPU (no side streams: a layer is gathered, used and freed before the next one) and 2 on a GPU
(FSDP2 all-gathers the next layer while the current one computes). The reduce-scatter replaces data
parallel's all-reduce: its working buffer is one layer's flattened gradients plus this rank's output
shard. Torch-free, a function of the plan's inputs like the rest of `cura.memory`.
"""

from __future__ import annotations

import math

from cura.memory.shapes import ModelShape
from cura.memory.spec import PlanSpec, Term
from cura.memory.weights import layer_trained_sizes

SHARDED = ("quantized base weights", "quantization constants", "full-precision base weights", "LoRA adapters")


def gathered_layers(spec: PlanSpec) -> int:
    """Whole layers alive at once on a rank (the one computing, and on a GPU the one prefetched)."""
    return 2 if spec.device == "cuda" else 1


def shard_term(term: Term, shape: ModelShape, spec: PlanSpec) -> Term:
    """A persistent term of `SHARDED` as one rank holds it: 1/N of it plus the gathered layers' share.
    (Every one of those terms is spread evenly over the decoder layers: lm_head is never quantized and never
    a LoRA target.)"""
    if term.name not in SHARDED or not term.bytes:
        return term
    n, layers = spec.world_size, shape.num_layers
    per_layer = math.ceil(term.bytes / layers)
    g = min(gathered_layers(spec), layers)
    return Term(
        term.name,
        math.ceil(term.bytes / n) + g * per_layer,
        f"{term.formula}; / {n} ranks + {g} gathered layer{'s' if g > 1 else ''}",
    )


def shard_state(term: Term, host: int, spec: PlanSpec) -> tuple[Term, int]:
    """The optimizer state of one rank: 1/N of the device and host shares."""
    n = spec.world_size
    return Term(term.name, math.ceil(term.bytes / n), f"{term.formula}; / {n} ranks"), math.ceil(host / n)


def shard_gradients(term: Term, shape: ModelShape, spec: PlanSpec, phase: str) -> Term:
    """Gradients of one rank: its shard of those reduced so far, plus one layer's whole gradients in the
    phases that back-propagate through a layer (they exist until that layer's reduce-scatter)."""
    if not term.bytes:
        return term
    n = spec.world_size
    layer = sum(layer_trained_sizes(shape, spec)) * spec.param_bytes if phase.endswith("_layer") else 0
    return Term(
        term.name,
        math.ceil(term.bytes / n) + layer,
        f"{term.formula}; / {n} ranks" + (" + one layer's whole, before its reduce-scatter" if layer else ""),
    )


def reduce_scatter_buffers(shape: ModelShape, spec: PlanSpec) -> int:
    """One layer's gradients flattened for the reduce-scatter, and this rank's output shard of them."""
    layer = sum(layer_trained_sizes(shape, spec)) * spec.param_bytes
    return layer + math.ceil(layer / spec.world_size)
