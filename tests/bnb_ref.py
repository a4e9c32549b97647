"""bitsandbytes as the reference for the 4-bit format, on any CPU.

bitsandbytes 0.50 has two CPU code paths that depend on the processor, and both are wrong as a byte-level
reference on AVX-512 machines:

- its AVX-512 `dequantize_4bit` kernel indexes blocks per row, so it decodes wrongly when a row's length is
  not a multiple of the blocksize (its scalar kernel and its PyTorch backend index the flattened tensor,
  like the format and cura; bitsandbytes PR #2072 describes the scalar/AVX2 indexing);
- on CPUs with AVX-512 BF16, `Linear4bit.forward` in eval mode re-packs the weight into a bf16-scale layout
  for a fused bf16 kernel, so its outputs carry bf16 rounding that has nothing to do with the format.

The helpers below keep bitsandbytes' own code as the reference, on its exact float32 paths.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' dequantization of `packed`; through its PyTorch backend where its AVX-512 kernel
    would mis-index (a row length that is not a multiple of the blocksize)."""
    if state.shape[-1] % state.blocksize == 0:
        return bnbf.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(
        packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype
    )


def float_path(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every bitsandbytes `Linear4bit` of `model` on its float dequantize-then-matmul path."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
