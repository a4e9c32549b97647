"""LoRA dropout on the CPU: a mask hashed from (seed, element index), so it is cheap to make and never stored.

torch's CPU dropout draws one Bernoulli sample per element from its Mersenne-Twister generator on one
thread and keeps the mask (a float tensor the size of the input) for backward: on the bundled model in
bfloat16 that was 36% of a training step (420 masks of 1024 x 576 or 1024 x 1536 elements per step,
torch.profiler). Here the mask is a pure function of a 64-bit seed drawn from torch's generator and the
element's index:

    keep_i = (h_i >> 8) >= round(p * 2**24),   h_i = fmix32(fmix32(i + seed_lo) ^ seed_hi)

(fmix32 is MurmurHash3's 32-bit finalizer), computed by the compiled kernel `cura_dropout`
(`cura.quant.kernels.c`, all threads, vectorised) or by `reference_dropout` here in plain PyTorch (same
bits; used where the kernels are unavailable). Backward regenerates the mask from the seed, so nothing the
size of the input is saved for it. The drop probability is p rounded to a multiple of 2**-24; kept values
are scaled by 1 / (1 - p) as torch does. Because the seed comes from torch's generator, activation
checkpointing's RNG save/restore makes the recomputation draw the same mask, and a checkpoint's RNG state
resumes the same masks.

On other devices (CUDA) `lora_dropout` is torch's own dropout (fused there, its mask one byte).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cura.quant import kernels

THRESHOLD_BITS = 24
_M32 = 0xFFFFFFFF


def _threshold(p: float) -> int:
    return round(p * (1 << THRESHOLD_BITS))


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 h in [0, 2**32), without int64 overflow (split into 16-bit halves)."""
    lo = h & 0xFFFF
    hi = h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """The two 32-bit halves of a 64-bit seed (any Python int; taken mod 2**64)."""
    seed &= (1 << 64) - 1
    return seed & _M32, seed >> 32


def reference_keep(n: int, seed: int, p: float) -> torch.Tensor:
    """The keep mask (bool [n]) of `hash_dropout` in plain PyTorch: the specification of the kernel."""
    lo, hi = split_seed(seed)
    i = torch.arange(n, dtype=torch.int64)
    h = _fmix32(_fmix32((i + lo) & _M32) ^ hi)
    return (h >> 8) >= _threshold(p)


def reference_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """`hash_dropout` in plain PyTorch: x * (keep ? 1 / (1 - p) : 0) in float32, rounded to x's dtype."""
    keep = reference_keep(x.numel(), seed, p).view(x.shape)
    factor = keep.to(torch.float32) * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    return (x.to(torch.float32) * factor).to(x.dtype)


def hash_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """Dropout of a CPU tensor with the mask of (seed, index); the compiled kernel where available."""
    x = x.contiguous()
    lib = kernels.library_for(x)
    dtype_code = kernels.DTYPE_CODES.get(x.dtype)
    if lib is None or dtype_code is None or x.numel() >= 1 << 32:
        return reference_dropout(x, seed, p)
    out = torch.empty_like(x)
    lo, hi = split_seed(seed)
    scale = float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    bad = lib.cura_dropout(
        x.data_ptr(), out.data_ptr(), dtype_code, x.numel(), lo, hi, _threshold(p), scale,
        kernels.threads_for(x.numel()),
    )  # fmt: skip
    return reference_dropout(x, seed, p) if bad else out


class _HashDropout(torch.autograd.Function):
    """Forward and backward multiply by the same regenerated mask; only the seed is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
        ctx.seed, ctx.p = seed, p
        return hash_dropout(x, seed, p)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return hash_dropout(grad, ctx.seed, ctx.p), None, None


def draw_seed() -> int:
    """A 64-bit seed from torch's CPU generator (so checkpointing and resume replay it)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)


class LoRADropout(nn.Dropout):
    """`nn.Dropout` (same attribute, same repr, no state) whose CPU training path is `hash_dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or self.p >= 1 or self.inplace:
            return F.dropout(x, self.p, self.training, self.inplace)
        return _HashDropout.apply(x, draw_seed(), self.p)
