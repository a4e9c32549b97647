"""The floating-point work of one LoRA / QLoRA training step, for MFU (model FLOPs utilisation).

MFU = lora_step_flops(...).total / (step seconds * the machine's peak matmul FLOP/s). These are *model*
FLOPs: the multiply-adds the step's mathematics needs (2 FLOPs each), counted from the model's shape, the
same for every implementation, so a tool that does extra work (a full-vocabulary logits tensor, recomputing
the loss head) is not credited for it. Torch-free, like the rest of `cura.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cura.memory.shapes import ModelShape


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step by part; `total` is their sum."""

    linear: int  # frozen decoder linears: forward, recomputation, input gradient
    attention: int  # scores and weighted values (causal half): forward, recomputation, backward
    lora: int  # the adapters' A and B: forward, recomputation, input and weight gradients
    head: int  # the output layer on the predicted positions: forward and input gradient

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.lora + self.head


def lora_step_flops(
    shape: ModelShape,
    batch: int,
    seq_len: int,
    r: int,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    checkpointing: bool = True,
) -> StepFlops:
    """Model FLOPs of one optimizer step of LoRA (rank `r` on `targets`) over `batch` x `seq_len` tokens.

    With N = batch * seq_len tokens, per decoder layer (one matmul [N, k] x [k, m] is 2 N k m FLOPs):

        linear     2 N sum(k m) over the layer's 7 linears, once for the forward, once more for the
                   recomputation under activation checkpointing, once for the input gradient
                   (dL/dx = dL/dy W costs what the forward did); no weight gradient, W is frozen
        attention  causal scores Q K^T and weighted values P V: 2 * 2 B heads head_dim T(T+1)/2 (only
                   the lower triangle is needed); forward, recomputation, and backward at twice the
                   forward (dQ, dK from dS; dV, dP from dO: four products instead of two)
        LoRA       2 N r (k + m) per target for x A^T then (.) B^T; forward, recomputation, the input
                   gradient and the two weight gradients (3x the forward in backward)

    and once per step the output layer on the B (T - 1) predicted positions: forward and input gradient,
    2 * 2 B (T - 1) H V. Softmax, norms, activations, dropout and the optimizer are not matmul FLOPs and are
    left out (they are the "other" of the profile); so is the embedding lookup.
    """
    n = batch * seq_len
    passes = 3 if checkpointing else 2  # forward (+ recomputation) + input gradient
    linears = shape.linears()
    linear = passes * 2 * n * sum(k * m for k, m in linears.values())
    causal_pairs = batch * seq_len * (seq_len + 1) // 2
    attention_fwd = 2 * 2 * shape.num_heads * shape.head_dim * causal_pairs
    attention = attention_fwd * ((2 if checkpointing else 1) + 2)
    lora_fwd = sum(2 * n * r * (linears[t][0] + linears[t][1]) for t in targets if t in linears)
    lora = lora_fwd * ((2 if checkpointing else 1) + 3)
    head = 2 * 2 * batch * (seq_len - 1) * shape.hidden_size * shape.vocab_size
    return StepFlops(
        linear=shape.num_layers * linear,
        attention=shape.num_layers * attention,
        lora=shape.num_layers * lora,
        head=head,
    )
