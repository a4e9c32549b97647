"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv 2106.09685).

    x ──┬──────────── base_layer (frozen W0: nn.Linear or 4-bit Linear4bit) ─────────┐
        │                                                                           (+)──> y
        └─ dropout ─> lora_A (r x in, Kaiming-uniform) ─> lora_B (out x r, zeros) ─> * scale ─┘

    y = W0 x + scale * B A dropout(x),    scale = alpha / r            (LoRA)
                                          scale = alpha / sqrt(r)      (rsLoRA, Kalajdzievska 2023, 2312.03732)

B starts at zero, so a fresh adapter leaves the base model's outputs unchanged. The update is added by one
GEMM that accumulates onto the base's output (`add_update`: addmm with alpha = scale) instead of PEFT's
`base + lora_B(lora_A(dropout(x))) * scale` in three passes; the two agree to rounding (float32: within an
ulp; bfloat16: ours rounds once where PEFT rounds three times). `lora_A` and `lora_B` are plain
`nn.Linear(bias=False)`: state-dict keys end in `lora_A.weight` and `lora_B.weight`, as in the PEFT format.

Shared inputs: q/k/v read the same normed hidden state, gate/up too. With dropout > 0 such siblings form a
`SharedInputGroup` (`cura.adapters.attach` makes them): the first of them to run draws one dropout mask
for the group and multiplies the dropped input by its members' A matrices concatenated, [A_q; A_k; A_v], in
one matmul; the others take their slice of that product (matched by the input tensor's identity and
version, so a sibling called on another tensor computes its own). One mask and one dropped copy per
input instead of one per layer, and one matmul (and in backward one input-gradient and one weight-gradient
matmul) instead of three. Each mask is still a Bernoulli(1 - p) mask per element; only the siblings now
see the same one. With dropout 0 every layer computes on its own, exactly as PEFT's (the concatenated
matmul would round differently in the last bit). State dicts are unchanged (per layer `lora_A.weight`).

Precision: A and B are float32 master weights whatever the base computes in; the update is computed in the
base's output dtype (weights cast on the fly, as torch autocast does), so a bfloat16 base runs its LoRA
matmuls in bfloat16 while the optimizer updates float32 weights (an update of lr * 1 on a weight of ~0.04
survives in float32; in bfloat16 it would round away once lr falls below ~2e-4).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cura.nn.dropout import LoRADropout


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _device_of(base: nn.Module) -> torch.device:
    tensors = [t for t in (*base.parameters(recurse=False), *base.buffers(recurse=False))]
    return tensors[0].device if tensors else torch.device("cpu")


class LoRALinear(nn.Module):
    """`y = base_layer(x) + scale * lora_B(lora_A(dropout(x)))` around any layer with in/out_features."""

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.05, use_rslora: bool = False
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = lora_scale(r, alpha, use_rslora)
        self.enabled = True  # False: the layer is its base (the reference model of DPO/KTO, no copy held)
        self.shared_input: SharedInputGroup | None = None  # set by SharedInputGroup
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32, device=device)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A like PEFT (Kaiming-uniform, a=sqrt(5)); B zeros, so the adapter starts as the identity."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # some model code reads `proj.weight.dtype`
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        dtype = result.dtype  # the base's compute dtype
        low_rank = self.shared_input.low_rank(self, x, dtype) if self.shared_input is not None else None
        if low_rank is None:
            low_rank = F.linear(self.lora_dropout(x.to(dtype)), self.lora_A.weight.to(dtype))
        return add_update(result, low_rank, self.lora_B.weight.to(dtype), self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}"


def add_update(result: torch.Tensor, low_rank: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``result + scale * (low_rank @ b^T)`` as one GEMM that accumulates onto `result` (addmm, beta 1).

    PEFT computes it in three passes over the (tokens x out) output: the product, its scaling, the sum;
    and its backward scales the full (tokens x out) gradient once more. addmm writes ``result + scale *
    product`` in one GEMM, and its backward scales only the small (tokens x r) and (r x out) gradients.
    Rounding: the product is not rounded before the sum (one rounding instead of three in bfloat16, within
    an ulp of PEFT's in float32), so outputs agree with PEFT's to rounding, not bit for bit.
    """
    if result.dim() < 2 or result.dtype != low_rank.dtype:
        return result + F.linear(low_rank, b) * scale
    rows = low_rank.reshape(-1, low_rank.shape[-1])
    return torch.addmm(result.reshape(-1, result.shape[-1]), rows, b.t(), alpha=scale).view(result.shape)


@dataclass
class _Pending:
    """The group's product for one input, waiting for the members that have not run yet."""

    x: weakref.ref
    version: int
    dtype: torch.dtype
    parts: dict[int, torch.Tensor]  # member index -> its (..., r) slice


class SharedInputGroup:
    """LoRA layers that read the same input: one dropout mask and one concatenated A matmul for all."""

    def __init__(self, members: list[LoRALinear]) -> None:
        self.members = list(members)
        self._pending: _Pending | None = None
        for member in self.members:
            member.shared_input = self

    def _active(self) -> bool:
        first = self.members[0]
        return all(
            m.enabled and m.training == first.training and m.lora_dropout.p == first.lora_dropout.p
            for m in self.members
        )

    def low_rank(self, member: LoRALinear, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """`member`'s A dropout(x) (in `dtype`): its slice of the group's product for this very `x`,
        computed now if no sibling has; None when the group does not apply (the member computes alone)."""
        index = self.members.index(member)
        pending = self._pending
        if (
            pending is not None
            and pending.x() is x
            and pending.version == x._version
            and pending.dtype == dtype
            and index in pending.parts
        ):
            part = pending.parts.pop(index)
            if not pending.parts:
                self._pending = None
            return part
        if not self._active():
            return None
        dropped = member.lora_dropout(x.to(dtype))
        a = torch.cat([m.lora_A.weight for m in self.members]).to(dtype)
        parts = F.linear(dropped, a).split([m.r for m in self.members], dim=-1)
        others = {i: p for i, p in enumerate(parts) if i != index}
        self._pending = _Pending(weakref.ref(x), x._version, dtype, others) if others else None
        return parts[index]

    def __getstate__(self) -> dict:  # torch.save / pickle of a whole model: the pending slices are transient
        return {"members": self.members, "_pending": None}

    def __deepcopy__(self, memo):  # a copied model gets its own group over its own layers
        import copy

        group = SharedInputGroup.__new__(SharedInputGroup)
        memo[id(self)] = group
        group.members = copy.deepcopy(self.members, memo)
        group._pending = None
        return group
