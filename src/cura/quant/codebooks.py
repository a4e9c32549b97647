"""The code books of the 4-bit and 8-bit formats, derived in code (and pinned by tests to bitsandbytes).

NF4 (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, appendix E): 16 values that are quantiles of the
standard normal N(0, 1), asymmetric so that zero is exact::

    p+ = linspace(0.9677083, 0.5, 9)[:-1]      (float32 grid)   -> 8 positive values  Phi^-1(p+)
    p- = linspace(0.9677083, 0.5, 8)[:-1]                       -> 7 negative values -Phi^-1(p-)
    code = sort(pos + neg + [0]) / max                          (divided in float32)

FP4 (bitsandbytes order, 1 sign bit, 2 exponent bits, 1 mantissa bit): index i and i + 8 differ by sign.

Dynamic 8-bit map (Dettmers 2015, arXiv 1511.04561; bitsandbytes ``create_dynamic_map(signed=True)``):
for exponent i = 0..6 the means of ``2**i + 1`` evenly spaced points in [0.1, 1], times ``10**(i - 6)``,
with both signs, plus 0 and 1: 256 sorted values used to store the absmax of double quantization (and
the first moment of the 8-bit optimizer state); the unsigned map (``2**(i + 1)`` points, one sign) stores
the second moment.
"""

from functools import cache
from statistics import NormalDist

import torch

from cura.constants import QUANT_TYPES

__all__ = ["QUANT_TYPES", "code_4bit", "dynamic_map", "dynamic_map_signed"]

NF4_OFFSET = 0.9677083
"""The outermost normal quantile probability of NF4 (bitsandbytes `create_normal_map(offset=0.9677083)`)."""

_FP4_VALUES = (0.0, 0.0052083335, 0.6666667, 1.0, 0.33333334, 0.5, 0.16666667, 0.25)


@cache
def _nf4() -> torch.Tensor:
    inv_cdf = NormalDist().inv_cdf
    pos = [inv_cdf(p) for p in torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].tolist()]
    neg = [-inv_cdf(p) for p in torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].tolist()]
    values = torch.tensor(sorted(pos + neg + [0.0]), dtype=torch.float32)
    return values / values.max()


@cache
def _fp4() -> torch.Tensor:
    return torch.tensor(_FP4_VALUES + tuple(-v for v in _FP4_VALUES), dtype=torch.float32)


@cache
def _dynamic(signed: bool) -> torch.Tensor:
    data: list[float] = []
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()  # float32 products
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16-entry float32 code book of `quant_type` ("nf4" or "fp4"), indexed by the 4-bit code."""
    if quant_type == "nf4":
        return _nf4().clone()
    if quant_type == "fp4":
        return _fp4().clone()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}; pick one of those.")


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted float32 values of bitsandbytes' ``create_dynamic_map(signed)`` (max_exponent_bits=7).

    The unsigned map (for values that are never negative, e.g. Adam's second moment) spends the sign bit on
    twice as many fraction bins per exponent: ``2**(i + 1)`` instead of ``2**i``.
    """
    return _dynamic(signed).clone()


def dynamic_map_signed() -> torch.Tensor:
    """The 256-entry signed dynamic 8-bit map used for double quantization (sorted, float32)."""
    return dynamic_map(signed=True)
