"""8-bit optimizer state: blockwise dynamic quantization (Dettmers et al. 2021, arXiv 2110.02861).

A state tensor is flattened and cut into blocks of 256; each block keeps its absmax (float32) and each
element the uint8 index of the nearest value of x / absmax in a 256-entry "dynamic" code (a decimal exponent
plus a fraction, so tiny and large values both keep ~2 significant digits). The first moment uses the
signed code, the second moment (never negative) the unsigned one, as in bitsandbytes' 8-bit optimizers.
Storage: 8 + 32/256 = 8.125 bits per value instead of 32.

The quantizer and the code books are the 4-bit format's own (`cura.quant.blockwise.quantize_blocks` with
``divide=True``, as used for double quantization, and `cura.quant.codebooks.dynamic_map`); this module adds
only the optimizer's one rule on top (a positive second moment never rounds to zero).
"""

from __future__ import annotations

import torch

from cura.constants import STATE8_BLOCKSIZE
from cura.quant.blockwise import dequantize_blocks, quantize_blocks
from cura.quant.codebooks import dynamic_map

__all__ = ["STATE8_BLOCKSIZE", "dequantize_blockwise", "dynamic_map", "quantize_blockwise"]


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, float32 absmax per 256-block): each element the nearest code of x/absmax.

    An all-zero block has absmax 0 (so it dequantizes to exact zeros). With the unsigned code a positive
    value never gets the code of 0 (it takes the smallest positive code instead): a second moment rounded
    to zero would turn m / (sqrt(v) + eps) into a huge step.
    """
    flat = x.detach().reshape(-1)
    codes, absmax = quantize_blocks(flat, code, STATE8_BLOCKSIZE, divide=True)
    if code[0] >= 0:  # unsigned: code 0 is the value 0, code 1 the smallest positive value
        codes[(codes == 0) & (flat > 0)] = 1
    return codes.view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """code[codes] * absmax of each element's block, shaped like `codes`."""
    return dequantize_blocks(codes, absmax, code, STATE8_BLOCKSIZE).view(codes.shape).to(dtype)
