"""8-bit optimizer state: blockwise dynamic quantization (Dettmers et al. 2021, arXiv 2110.02861).

A state tensor is flattened and cut into blocks of 256; each block keeps its absmax (float32) and each
element the uint8 index of the nearest value of x / absmax in a 256-entry "dynamic" code (a decimal exponent
plus a fraction, so tiny and large values both keep ~2 significant digits). The first moment uses the
signed code, the second moment (never negative) the unsigned one, as in bitsandbytes' 8-bit optimizers.
Storage: 8 + 32/256 = 8.125 bits per value instead of 32.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256


@functools.cache
def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted code values of bitsandbytes' `create_dynamic_map(signed)` (max_exponent_bits=7).

    For exponent i = 0..6 the fraction bins are the midpoints of `linspace(0.1, 1, n + 1)` scaled by
    10**(i - 6), with n = 2**i (signed, and mirrored) or 2**(i + 1) (unsigned); plus 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        n = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, n + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like x, float32 absmax per 256-block): each element the nearest code of x/absmax.

    An all-zero block has absmax 0 and the code of 0. With the unsigned code a positive value never gets the
    code of 0 (it takes the smallest positive code instead): a second moment rounded to zero would turn
    m / (sqrt(v) + eps) into a huge step.
    """
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)  # (n_blocks, 256)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
    # the nearest code is the number of midpoints between codes that lie below x (a tie goes to the lower)
    code = code.to(flat.device)
    mids = (code[:-1] + code[1:]) / 2
    if code[0] >= 0:  # unsigned: keep positive values off the zero code
        mids[0] = 0.0
    idx = torch.searchsorted(mids, scaled.reshape(-1))
    codes = idx.reshape(-1)[: flat.numel()].to(torch.uint8).view(x.shape)
    return codes, absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """code[codes] * absmax of each element's block, shaped like `codes`."""
    flat = code.to(codes.device)[codes.reshape(-1).long()]
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK) * absmax.unsqueeze(1)
    return blocks.reshape(-1)[: codes.numel()].view(codes.shape).to(dtype)
