"""The 4-bit format (NF4 / FP4, blockwise absmax, double quantization), byte-compatible with bitsandbytes.

Pure tensor functions: no modules, no I/O. See `cura.quant.blockwise` for the bit layout and
`cura.quant.tensor` for the on-disk (state-dict) layout.
"""

from cura.constants import BLOCKSIZES, NESTED_BLOCKSIZE, QUANT_TYPES
from cura.quant.codebooks import code_4bit, dynamic_map_signed
from cura.quant.tensor import QuantizedTensor, dequantize, quantize

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "QuantizedTensor",
    "code_4bit",
    "dequantize",
    "dynamic_map_signed",
    "quantize",
]
