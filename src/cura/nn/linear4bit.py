"""`Linear4bit`: a frozen linear layer whose weight is stored in 4 bits (NF4/FP4, bitsandbytes layout).

    y = x @ dequant(W4)^T (+ bias)

The autograd function saves only the 4-bit weight (packed codes and block scales; x is not needed because
W is frozen) and dequantizes again in backward, ``dL/dx = dL/dy @ dequant(W4)``: in a plain forward a
dequantized copy never outlives one matmul (on a CPU it goes into one reused scratch buffer per thread and
dtype, `dequantize_for_matmul`). On a CPU under activation checkpointing, the forward that backward reruns
(the recompute, one layer at a time) keeps its dequantized copy for the backward that follows it
(`_recomputed`), so each weight is decoded twice per step instead of three times, at the price of one
layer's weights in the compute dtype while that layer's backward runs (counted by `cura.memory`). A layer
whose output the recompute never needs (`recompute_output_unused`: a decoder layer's MLP output projection,
added straight onto the residual stream; `mark_residual_outputs`) skips that matmul in the recompute and
decodes its weight in backward as without checkpointing: a quarter of the recompute's base-weight FLOPs on a
Llama-shaped layer.

The 4-bit tensors are buffers (they follow ``module.to(device)`` and never appear in ``parameters()``);
``state_dict()`` holds exactly the keys transformers + bitsandbytes write for the layer (``weight``,
``weight.absmax``, ``weight.quant_map``, ..., ``bias``), and ``load_state_dict`` reads them.
"""

import threading

import torch
from torch import nn

from cura.constants import (
    DEFAULT_BLOCKSIZE,
    DEFAULT_DOUBLE_QUANT,
    DEFAULT_LORA_EXCLUDE,
    DEFAULT_QUANT_TYPE,
    RESIDUAL_MLP_OUTPUT_MODEL_TYPES,
)
from cura.nn.select import matches
from cura.quant import QuantizedTensor, kernels, quantize, triton_kernels

_QUANT_BUFFERS = ("absmax", "code", "nested_absmax", "nested_code")


class _Scratch(threading.local):
    """Per thread, one CPU buffer per compute dtype that every 4-bit layer dequantizes into."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}


_scratch = _Scratch()


def dequantize_for_matmul(weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` dequantized in `dtype` for one matmul that reads it and lets it go.

    On a CPU the values go into this thread's scratch buffer for `dtype`, grown to the largest weight seen
    and reused by every layer, forward and backward: no fresh allocation per call. A fresh tensor of a few
    MiB costs a page fault per 4 KiB on first write whenever glibc maps it afresh (always with
    cpu_malloc=tight), and with glibc's default it is one more block the heaps keep. The buffer's contents
    are only valid until the next call on this thread, which is all a synchronous CPU matmul needs. Other
    devices (an asynchronous stream, a caching allocator of their own) get a fresh tensor.
    """
    if weight.packed.device.type != "cpu" or dtype not in kernels.DTYPE_CODES:
        return weight.dequantize(dtype)
    buffer = _scratch.buffers.get(dtype)
    if buffer is None or buffer.numel() < weight.numel:
        buffer = _scratch.buffers[dtype] = torch.empty(weight.numel, dtype=dtype)
    return weight.dequantize(dtype, out=buffer[: weight.numel])


_recomputed: dict[tuple[int, torch.dtype], torch.Tensor] = {}
"""Dequantized weights made by a recompute (a forward run inside backward, as activation checkpointing does)
for the backward of the same matmul, keyed by the packed tensor's address and the dtype. Side channel
rather than ``ctx``: non-reentrant checkpointing runs backward on the original forward's ``ctx`` and only
swaps in the tensors the recompute saved, so what the recompute keeps must travel outside autograd (and
must not change how many tensors it saves). Each entry lives from the recompute to that backward."""


def _in_recompute(x: torch.Tensor) -> bool:
    """Whether this CPU forward runs inside a backward pass (a checkpointed layer's recompute) and its
    backward will follow: only then is a dequantized copy worth keeping."""
    return x.device.type == "cpu" and x.requires_grad and torch._C._current_graph_task_id() != -1


class _Dequantized4bitMatmul(torch.autograd.Function):
    """``x @ dequant(W)^T``; saves the 4-bit tensors only and dequantizes them again in backward (except
    after a CPU recompute, which leaves its copy in `_recomputed`)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedTensor, dtype: torch.dtype, unused, packed, absmax, nested_absmax):
        # `packed`, `absmax`, `nested_absmax` are the tensors inside `weight`, passed so that autograd
        # sees (and saved-tensor hooks count) exactly what is kept for backward.
        ctx.weight = weight
        ctx.save_for_backward(packed, absmax, nested_absmax)
        if matmul_backend(x.device, x.numel() // max(1, x.shape[-1]), dtype) == "fused":
            return triton_kernels.matmul_4bit(x, weight, dtype)
        if _in_recompute(x):
            if unused:  # nothing the recompute rebuilds reads this output: the matmul is skipped
                return x.new_zeros(*x.shape[:-1], weight.shape[0])
            w = _recomputed[(packed.data_ptr(), dtype)] = weight.dequantize(dtype)
            return x @ w.t()
        return x @ dequantize_for_matmul(weight, dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, nested_absmax = ctx.saved_tensors  # keeps them alive (and version-checked)
        kept = _recomputed.pop((packed.data_ptr(), grad_out.dtype), None)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        w = kept if kept is not None else dequantize_for_matmul(ctx.weight, grad_out.dtype)
        return grad_out @ w, None, None, None, None, None, None


def matmul_backend(device: torch.device, rows: int, dtype: torch.dtype) -> str:
    """How the forward matmul runs: ``"fused"`` (Triton dequantize-matmul, W decoded in registers) for a
    CUDA input of at most `FUSED_MAX_ROWS` rows where triton is installed, else ``"dequantize"`` (one
    dequantization of the whole weight, then torch's matmul: a few rows on a CPU, or many rows anywhere)."""
    fused = (
        device.type == "cuda"
        and rows <= triton_kernels.FUSED_MAX_ROWS
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and triton_kernels.triton_available()
    )
    return "fused" if fused else "dequantize"


def linear_4bit(
    x: torch.Tensor,
    weight: QuantizedTensor,
    bias: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    recompute_output_unused: bool = False,
) -> torch.Tensor:
    """``x @ dequant(weight)^T + bias`` in `compute_dtype` (default: x's dtype), returned in x's dtype.
    `recompute_output_unused`: see `Linear4bit.recompute_output_unused`."""
    dtype = compute_dtype or x.dtype
    y = _Dequantized4bitMatmul.apply(
        x.to(dtype),
        weight,
        dtype,
        recompute_output_unused,
        weight.packed,
        weight.absmax,
        weight.nested_absmax,
    )
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit weight; see the module docstring for the formula and layout."""

    recompute_output_unused = False
    """True where nothing a checkpointed recompute rebuilds reads this layer's output (set by
    `mark_residual_outputs`): a CPU recompute then returns zeros in place of the matmul. The layer's own
    backward never needs its output, so gradients are unchanged; the output of that recompute is wrong,
    which is harmless only because checkpointing discards it."""

    def __init__(
        self,
        weight: QuantizedTensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight [out, in], got shape {tuple(weight.shape)}.")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self._set_weight(weight)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        )

    def _set_weight(self, q: QuantizedTensor) -> None:
        self.register_buffer("weight", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("code", q.code)
        self.register_buffer("nested_absmax", q.nested_absmax)
        self.register_buffer("nested_code", q.nested_code)
        self._meta = dict(
            shape=q.shape,
            dtype=q.dtype,
            quant_type=q.quant_type,
            blocksize=q.blocksize,
            offset=q.offset,
            nested_blocksize=q.nested_blocksize,
        )

    @property
    def quant_type(self) -> str:
        return self._meta["quant_type"]

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The 4-bit weight as a `QuantizedTensor` view of this module's (current-device) buffers."""
        buffers = {name: getattr(self, name) for name in _QUANT_BUFFERS}
        return QuantizedTensor(packed=self.weight, **buffers, **self._meta)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = DEFAULT_QUANT_TYPE,
        blocksize: int = DEFAULT_BLOCKSIZE,
        double_quant: bool = DEFAULT_DOUBLE_QUANT,
        compute_dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        """Quantize `linear`'s weight (its bias stays in full precision)."""
        q = quantize(
            linear.weight.detach(), quant_type=quant_type, blocksize=blocksize, double_quant=double_quant
        )
        return cls(q, linear.bias, compute_dtype=compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(
            x, self.quantized_weight, self.bias, self.compute_dtype, self.recompute_output_unused
        )

    def extra_repr(self) -> str:
        m, bias, dq = self._meta, self.bias is not None, self._meta["offset"] is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, "
            f"quant_type={m['quant_type']}, blocksize={m['blocksize']}, double_quant={dq}"
        )

    def _apply(self, fn, recurse=True):
        """`module.to(device)` moves the 4-bit tensors; dtype casts (``.half()``, ``.to(bfloat16)``) leave
        them alone (only the bias is cast), so the codes and their scales are never altered."""
        # (under --fsdp, `cura.train.fsdp` has made some of them frozen parameters, which FSDP places itself)
        quant = {
            name: self._buffers.pop(name) for name in ("weight", *_QUANT_BUFFERS) if name in self._buffers
        }
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in quant.items():
                if t is not None:
                    t = t.to(fn(torch.empty(0, dtype=t.dtype, device=t.device)).device)
                self._buffers[name] = t
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the quant-state entries of the weight.
        entries = self.quantized_weight.to_bnb_state_dict(prefix + "weight")
        destination[prefix + "weight"] = entries.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias
        destination.update(entries)
        if not keep_vars:
            for key in [prefix + "weight", prefix + "bias", *entries]:
                if key in destination:
                    destination[key] = destination[key].detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        own = {k: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        # Only this layer's keys: "weight" and "weight.<part>" (not a sibling named "weight_x").
        own = {k: v for k, v in own.items() if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        if not own:
            missing_keys.append(prefix + "weight")
        else:
            try:
                q = QuantizedTensor.from_bnb_state_dict(own, prefix + "weight")
            except ValueError as err:
                error_msgs.append(str(err))
            else:
                if tuple(q.shape) != (self.out_features, self.in_features):
                    error_msgs.append(
                        f"size mismatch for {prefix}weight: checkpoint has {tuple(q.shape)}, "
                        f"the layer is {(self.out_features, self.in_features)}."
                    )
                else:
                    # A layer built on the meta device takes the checkpoint's tensors where they are.
                    self._set_weight(q if self.weight.is_meta else q.to(self.weight.device))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict and state_dict[bias_key].shape != self.bias.shape:
                error_msgs.append(
                    f"size mismatch for {bias_key}: checkpoint has {tuple(state_dict[bias_key].shape)}, "
                    f"the layer is {tuple(self.bias.shape)}."
                )
            elif bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict and strict:
            unexpected_keys.append(bias_key)


def quantize_model(
    model: nn.Module,
    *,
    skip: tuple[str, ...] = DEFAULT_LORA_EXCLUDE,
    include: tuple[str, ...] | None = None,
    quant_type: str = DEFAULT_QUANT_TYPE,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = DEFAULT_DOUBLE_QUANT,
    compute_dtype: torch.dtype | None = None,
) -> list[str]:
    """Replace every `nn.Linear` of `model` (in place) by a `Linear4bit`, one layer at a time.

    A layer is skipped when its name matches `skip` (`cura.nn.select.matches`: the name, or a suffix after
    a dot); when `include` is given, only names matching it are replaced. Each float weight is dropped as soon as
    its layer is swapped, so peak memory stays near the quantized size. Returns the replaced names.
    """
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not matches(name, skip)
        and (include is None or matches(name, include))
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(
            parent, child, Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
        )
        linear.weight = None  # drop the float weight now (the model no longer references it)
        del linear
    return names


def mark_residual_outputs(model: nn.Module) -> list[str]:
    """Set `Linear4bit.recompute_output_unused` on each decoder layer's 4-bit ``mlp.down_proj`` (under a
    LoRA wrapper or not) where the model's family adds it straight onto the residual stream
    (`cura.constants.RESIDUAL_MLP_OUTPUT_MODEL_TYPES`). Returns the marked paths."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in RESIDUAL_MLP_OUTPUT_MODEL_TYPES:
        return []
    marked = []
    for name, module in model.named_modules():
        if not name.endswith("mlp.down_proj"):
            continue
        base = getattr(module, "base_layer", module)
        if isinstance(base, Linear4bit):
            base.recompute_output_unused = True
            marked.append(name)
    return marked


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every `Linear4bit` of `model` (in place) back to an `nn.Linear` with the dequantized weight."""
    names = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer: Linear4bit = getattr(parent, child)
        q = layer.quantized_weight
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device=q.device, dtype=q.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(q.dequantize(q.dtype))
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        setattr(parent, child, linear)
    return model
