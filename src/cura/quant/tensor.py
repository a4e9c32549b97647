"""`QuantizedTensor`: a 4-bit (NF4/FP4) weight with its block scales, and its bitsandbytes state-dict form.

Storage per parameter (blocksize 64, nested blocksize 256)::

    without double quantization: 4 + 32 / 64              = 4.5   bits
    with double quantization:    4 + 8 / 64 + 32 / 16384  = 4.127 bits

On disk (transformers + bitsandbytes layout, for a weight key ``W``)::

    W                                   uint8 [ceil(n / 2), 1]   packed codes
    W.absmax                            uint8 [blocks] with DQ, else float32 [blocks]
    W.quant_map                         float32 [16]
    W.nested_absmax                     float32 [ceil(blocks / 256)]          (DQ only)
    W.nested_quant_map                  float32 [256]                         (DQ only)
    W.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape
                                        (+ nested_blocksize, nested_dtype, nested_offset with DQ)
"""

import ctypes
import dataclasses
import json
from functools import cache

import torch

from cura.constants import (
    BLOCKSIZES,
    DEFAULT_BLOCKSIZE,
    DEFAULT_DOUBLE_QUANT,
    DEFAULT_QUANT_TYPE,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
)
from cura.quant import kernels, triton_kernels
from cura.quant.blockwise import (
    dequantize_blocks,
    dequantize_packed,
    pack_nibbles,
    quad_table,
    quantize_blocks,
    unpack_nibbles,
)
from cura.quant.codebooks import code_4bit, dynamic_map_signed

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_KEY = "quant_state.bitsandbytes__"


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor stored as packed 4-bit codes plus per-block absmax (itself 8-bit with double quantization).

    `shape` and `dtype` describe the original tensor; `dequantize()` gives it back (approximately).
    """

    packed: torch.Tensor  # uint8 [ceil(n / 2), 1]
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] with double quantization
    code: torch.Tensor  # float32 [16]
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(blocks / 256)]
    nested_code: torch.Tensor | None = None  # float32 [256]
    offset: float | None = None  # mean of the float32 absmax, added back after dequantizing it
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage held: packed codes, absmax, code books and (with DQ) nested absmax + offset."""
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code)
        return sum(t.nbytes for t in tensors if t is not None) + (4 if self.offset is not None else 0)

    def absmax_float(self) -> torch.Tensor:
        """The float32 block scales: ``nested_code[absmax] * nested_absmax[block] + offset`` with DQ."""
        if not self.double_quant:
            return self.absmax
        scales = dequantize_blocks(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return scales.add_(self.offset)

    def dequantize(
        self, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The tensor back in `dtype` (default: the original dtype): ``code[c_i] * absmax[i // blocksize]``.

        With `out` (contiguous, same number of elements; float32, or on CPU also bfloat16 / float16) the
        values are written there in `out`'s dtype, so a caller that dequantizes repeatedly can reuse one
        buffer instead of fresh memory each time.
        On CPU the compiled kernels do the work (same bits; see `cura.quant.kernels`); on CUDA one Triton
        launch per weight (`dequant_backend` says which path a device takes).
        """
        backend = dequant_backend(self.device)
        if backend in ("c", "torch"):
            return dequantize_with(
                kernels.library_for(self.packed) if backend == "c" else None, self, dtype, out
            )
        return dequantize_on_device(backend, self, dtype, out)

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """The same quantized data on `device` (moved, never re-quantized)."""
        return dataclasses.replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            code=self.code.to(device),
            nested_absmax=None if self.nested_absmax is None else self.nested_absmax.to(device),
            nested_code=None if self.nested_code is None else self.nested_code.to(device),
        )

    def to_bnb_state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The entries transformers + bitsandbytes write for a 4-bit weight saved under the key `prefix`."""
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        out = {prefix: self.packed, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        if self.double_quant:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_code
            meta.update(
                nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=self.offset
            )
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.{_STATE_KEY}{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict[str, torch.Tensor], prefix: str) -> "QuantizedTensor":
        """Read the 4-bit weight stored under `prefix` in a transformers/bitsandbytes state dict."""
        state_keys = [k for k in state_dict if k.startswith(f"{prefix}.{_STATE_KEY}")]
        if prefix not in state_dict or len(state_keys) != 1:
            raise ValueError(
                f"state dict has no bitsandbytes 4-bit weight at {prefix!r} (needs {prefix!r} and one "
                f"'{prefix}.{_STATE_KEY}nf4|fp4' entry); save it with bitsandbytes or cura quantization."
            )
        meta = json.loads(bytes(state_dict[state_keys[0]].tolist()).decode("utf-8"))
        for key in ("absmax", "quant_map") + (
            ("nested_absmax", "nested_quant_map") if "nested_offset" in meta else ()
        ):
            if f"{prefix}.{key}" not in state_dict:
                raise ValueError(
                    f"state dict lacks {prefix}.{key} for its 4-bit weight; the checkpoint is incomplete."
                )
        packed = state_dict[prefix]
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)
        nested = "nested_offset" in meta
        return cls(
            packed=packed.reshape(-1, 1),
            absmax=state_dict[f"{prefix}.absmax"],
            code=state_dict[f"{prefix}.quant_map"].float(),
            shape=torch.Size(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            quant_type=meta["quant_type"],
            blocksize=int(meta["blocksize"]),
            nested_absmax=state_dict[f"{prefix}.nested_absmax"] if nested else None,
            nested_code=state_dict[f"{prefix}.nested_quant_map"].float() if nested else None,
            offset=float(meta["nested_offset"]) if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )


def _table(code: torch.Tensor) -> torch.Tensor:
    """The `quad_table` of a code book, built once per (values, device): it is 1 MiB and reused by every
    dequantization with that book."""
    return _cached_table(code.device, tuple(code.tolist()))


@cache
def _cached_table(device: torch.device, values: tuple[float, ...]) -> torch.Tensor:
    return quad_table(torch.tensor(values, dtype=torch.float32, device=device))


def _check_input(w: torch.Tensor, quant_type: str, blocksize: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"quantize expects a torch.Tensor, got {type(w).__name__}; pass the weight tensor.")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"quantize supports float32, bfloat16 and float16 tensors, got {w.dtype}; convert with .float()."
        )
    if w.is_meta:
        raise ValueError("cannot quantize a tensor on the meta device (it holds no values); load it first.")
    if w.numel() == 0:
        raise ValueError(
            f"cannot quantize an empty tensor of shape {tuple(w.shape)}; pass a non-empty weight."
        )
    if blocksize not in BLOCKSIZES:
        raise ValueError(
            f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}; {DEFAULT_BLOCKSIZE} is the QLoRA default."
        )
    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}; "
            f"{DEFAULT_QUANT_TYPE!r} is the QLoRA default."
        )


def quantize(
    w: torch.Tensor,
    quant_type: str = DEFAULT_QUANT_TYPE,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = DEFAULT_DOUBLE_QUANT,
) -> QuantizedTensor:
    """Quantize `w` blockwise to 4 bits (bitsandbytes-identical bytes), optionally with double quantization.

    ``codes, absmax = quantize_blocks(w, code, blocksize)``; with DQ also
    ``absmax8, nested_absmax = quantize_blocks(absmax - mean(absmax), dynamic_map, 256)``. On CPU the
    compiled kernels do the work (same bits; see `cura.quant.kernels`).
    """
    _check_input(w, quant_type, blocksize)
    return quantize_with(kernels.library_for(w), w.detach(), quant_type, blocksize, double_quant)


def quantize_with(
    lib: ctypes.CDLL | None, w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> QuantizedTensor:
    """`quantize` (without input checks) on the CPU kernels `lib`, or on the PyTorch reference where `lib`
    is None or the kernels decline (see `cura.quant.kernels`)."""
    code = code_4bit(quant_type).to(w.device)
    packed, absmax = _quantize_4bit(lib, w, code, blocksize)
    base = dict(code=code, shape=w.shape, dtype=w.dtype, quant_type=quant_type, blocksize=blocksize)
    if not double_quant:
        return QuantizedTensor(packed=packed, absmax=absmax, **base)
    offset = absmax.mean()
    nested_code = dynamic_map_signed().to(w.device)
    absmax8, nested_absmax = _quantize_8bit(lib, absmax - offset, nested_code)
    return QuantizedTensor(
        packed=packed,
        absmax=absmax8,
        nested_absmax=nested_absmax,
        nested_code=nested_code,
        offset=offset.item(),
        **base,
    )


def _quantize_4bit(
    lib: ctypes.CDLL | None, w: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    fast = kernels.quantize_4bit(w, code, blocksize, lib)
    if fast is not None:
        return fast
    codes, absmax = quantize_blocks(w, code, blocksize)
    return pack_nibbles(codes, pad_code=int(code.abs().argmin())), absmax


def _quantize_8bit(
    lib: ctypes.CDLL | None, x: torch.Tensor, code: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    fast = kernels.quantize_8bit(x, code, NESTED_BLOCKSIZE, lib)
    return fast if fast is not None else quantize_blocks(x, code, NESTED_BLOCKSIZE, divide=True)


def dequantize_with(
    lib: ctypes.CDLL | None,
    q: QuantizedTensor,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`QuantizedTensor.dequantize` on the CPU kernels `lib`, or on the PyTorch reference where `lib` is
    None or the kernels decline (see `cura.quant.kernels`)."""
    dtype = dtype or q.dtype
    if out is not None and (
        out.dtype not in kernels.DTYPE_CODES or not out.is_contiguous() or out.numel() != q.numel
    ):
        raise ValueError(
            f"out must be a contiguous float32, bfloat16 or float16 tensor of {q.numel} elements, "
            f"got {out.dtype} {tuple(out.shape)}."
        )
    if lib is not None:
        target = out if out is not None else kernels.empty(q.numel, _kernel_dtype(dtype))
        nested = (q.nested_absmax, q.nested_code, q.offset, q.nested_blocksize) if q.double_quant else None
        done = kernels.dequantize_4bit(q.packed, q.absmax, q.code, q.blocksize, q.numel, nested, target, lib)
        if done is not None:
            return target.view(q.shape) if out is not None else target.view(q.shape).to(dtype)
    direct = out if out is not None and out.dtype == torch.float32 else None  # else decode, then round once
    values = dequantize_packed(q.packed, q.absmax_float(), _table(q.code), q.blocksize, q.numel, direct)
    values = values.view(q.shape)
    if out is None:
        return values.to(dtype)
    return values if direct is not None else out.view(q.shape).copy_(values)


def dequant_backend(device: torch.device) -> str:
    """Which implementation dequantizes a weight held on `device`, decided once, explicitly:

    - ``"c"``: a CPU tensor with the compiled kernels enabled (they may still decline: NaN, no compiler;
      then the reference runs, see `dequantize_with`);
    - ``"torch"``: a CPU tensor with ``CURA_KERNELS=0``: the reference, `dequantize_packed` (its
      cache-sized chunk loop is tuned for CPU caches and threads);
    - ``"triton"``: a CUDA tensor where triton is installed: one kernel launch per weight;
    - ``"torch-whole"``: any other accelerator, or CUDA without triton: the reference formula on the whole
      tensor at once (a handful of launches), never the CPU chunk loop.
    """
    if device.type == "cpu":
        return "c" if kernels.enabled() else "torch"
    if device.type == "cuda" and triton_kernels.triton_available():
        return "triton"
    return "torch-whole"


def dequantize_on_device(
    backend: str, q: QuantizedTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`QuantizedTensor.dequantize` through an accelerator backend of `dequant_backend` ("triton" or
    "torch-whole"); also callable on CPU tensors (the tests run "triton" in Triton's interpreter)."""
    dtype = dtype or q.dtype
    if backend == "triton":
        direct = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        values = triton_kernels.dequantize_4bit(q, torch.float32 if out is not None else direct, out)
    elif backend == "torch-whole":
        codes = unpack_nibbles(q.packed, q.numel)
        values = dequantize_blocks(codes, q.absmax_float(), q.code, q.blocksize)
        if out is not None:
            values = out.view(-1).copy_(values)
    else:
        raise ValueError(
            f"unknown accelerator dequantization backend {backend!r}; use 'triton' or 'torch-whole'."
        )
    return values.view(q.shape) if out is not None else values.view(q.shape).to(dtype)


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels write float32, bfloat16 and float16 directly; anything else goes through float32."""
    return dtype if dtype in kernels.DTYPE_CODES else torch.float32


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized tensor of `q` in `dtype` (default: the dtype it was quantized from)."""
    return q.dequantize(dtype)
