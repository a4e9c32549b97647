"""ggml's reference quantizers in numpy: the bytes llama.cpp's `llama-quantize` writes without an imatrix.

Each type quantizes a row of float32 values in blocks, independently of every other block; a tensor of shape
(rows, n) becomes uint8 of shape (rows, n / block * bytes), the layout `gguf.GGUFWriter.add_tensor(...,
raw_dtype=...)` takes and `gguf.quants.dequantize` reads.

    type   block  bytes  layout (C struct in ggml-common.h)             reference (ggml-quants.c)
    Q8_0   32     34     d f16, qs int8[32]                                 quantize_row_q8_0_ref
    Q4_0   32     18     d f16, qs[16] (element j low nibble, j+16 high)    quantize_row_q4_0_ref
    Q5_0   32     22     d f16, qh u32 (5th bits), qs[16]                   quantize_row_q5_0_ref
    Q5_1   32     24     d f16, m f16, qh u32, qs[16]                       quantize_row_q5_1_ref
    Q4_K   256    144    d f16, dmin f16, scales[12] (8 x 6-bit scale+min), qs[128]   quantize_row_q4_K_ref
    Q5_K   256    176    d f16, dmin f16, scales[12], qh[32], qs[128]       quantize_row_q5_K_ref
    Q6_K   256    210    ql[128], qh[64], scales int8[16], d f16            quantize_row_q6_K_ref

The K-quant searches (`make_qx_quants`, `make_qkx2_quants`) are the C loops vectorised over blocks: every
candidate scale is tried for all blocks at once and each block keeps its own best. `nearest_int` in C is
round-half-to-even (the 1.5 * 2^23 trick), which is `np.rint` here. Sums run in float32 in another order
than C's, so a value at an exact tie can land on the other code: bytes agree with llama-quantize except at
such ties (what the tests check is the layout against gguf-py's independent dequantizers, the Q4_0, Q5_0,
Q5_1 and Q8_0 bytes against gguf-py's quantizers, and the file in llama.cpp itself).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
F32 = np.float32

BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K}
BYTES = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(values: np.ndarray) -> np.ndarray:
    """float32 -> the two bytes of its float16 (GGML_FP32_TO_FP16), shape (..., 2)."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_value(values: np.ndarray) -> np.ndarray:
    """The float32 a float16 field reads back as (GGML_FP16_TO_FP32 of GGML_FP32_TO_FP16)."""
    return values.astype(np.float16).astype(F32)


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the value of largest magnitude (the first one, as the C loops' `>` keeps), shape (m, 1)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1, keepdims=True), axis=-1)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | ((hi.astype(np.uint8) & 0xF) << 4)


def _qh32(codes: np.ndarray) -> np.ndarray:
    """The 5th bit of 32 codes as a little-endian uint32 (bit j: element j), shape (m, 4)."""
    bits = ((codes.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32).reshape(-1, 1).view(np.uint8)


# ---- 32-element types -------------------------------------------------------------------------------------


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """d = absmax / 127, q = roundf(x / d) (half away from zero)."""
    d = np.abs(x).max(axis=-1, keepdims=True) / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    v = x * inv
    q = (np.sign(v) * np.floor(np.abs(v) + F32(0.5))).astype(np.int8)
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=-1)


def _q4_5_0(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, codes) of Q4_0 (levels 16) / Q5_0 (32): d = signed absmax / -(levels/2), codes truncated."""
    d = _first_absmax(x) / F32(-(levels // 2))
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    codes = np.trunc(x * inv + F32(levels // 2 + 0.5)).astype(np.int32)
    return d, np.minimum(levels - 1, codes)


def quantize_q4_0(x: np.ndarray) -> np.ndarray:
    d, q = _q4_5_0(x, 16)
    return np.concatenate([_f16(d), _nibbles(q[:, :16], q[:, 16:])], axis=-1)


def quantize_q5_0(x: np.ndarray) -> np.ndarray:
    d, q = _q4_5_0(x, 32)
    return np.concatenate([_f16(d), _qh32(q), _nibbles(q[:, :16], q[:, 16:])], axis=-1)


def quantize_q5_1(x: np.ndarray) -> np.ndarray:
    """d = (max - min) / 31, m = min, codes = trunc((x - min) / d + 0.5)."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    d = (hi - lo) / F32(31)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    q = np.trunc((x - lo) * inv + F32(0.5)).astype(np.int32)
    return np.concatenate([_f16(d), _f16(lo), _qh32(q), _nibbles(q[:, :16], q[:, 16:])], axis=-1)


# ---- K-quant searches -------------------------------------------------------------------------------------


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)` per row of `x` (m, n): the symmetric scale
    that maximises the x^2-weighted fit, trying iscale = -(nmax + 0.1 is) / max for is in -9..9.
    Returns (scale (m,), codes in [0, 2 nmax) (m, n))."""
    mx = _first_absmax(x)[:, 0]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x

    def attempt(iscale):
        level = np.clip(np.rint(iscale[:, None] * x), -nmax, nmax - 1)
        return level, (w * x * level).sum(-1, dtype=F32), (w * level * level).sum(-1, dtype=F32)

    level, sumlx, suml2 = attempt((F32(-nmax) / mx).astype(F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
    best, codes = scale * sumlx, level + nmax
    for step in range(-9, 10):
        if step == 0:
            continue
        level, sumlx, suml2 = attempt((-(F32(nmax) + F32(0.1) * F32(step)) / mx).astype(F32))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sumlx / suml2, scale).astype(F32)
        best = np.where(better, scale * sumlx, best)
        codes = np.where(better[:, None], level + nmax, codes)
    return np.where(zero, F32(0), scale), np.where(zero[:, None], 0, codes).astype(np.int32)


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's `make_qkx2_quants(..., use_mad=false)` per row: an affine fit x ~ scale * L - min (min >= 0)
    minimising the weighted squared error over iscale = (rmin + rdelta is + nmax) / (max - min), is 0..nstep.
    Returns (scale (m,), the_min (m,) >= 0, codes in [0, nmax] (m, n))."""
    lo = np.minimum(x.min(-1), F32(0))
    hi = x.max(-1)
    flat = hi == lo
    span = np.where(flat, F32(1), hi - lo).astype(F32)
    sum_w, sum_x = weights.sum(-1, dtype=F32), (weights * x).sum(-1, dtype=F32)
    shifted = x - lo[:, None]

    iscale = (F32(nmax) / span).astype(F32)
    scale, low = (F32(1) / iscale).astype(F32), lo.copy()
    codes = np.clip(np.rint(iscale[:, None] * shifted), 0, nmax)
    best = (weights * (scale[:, None] * codes + lo[:, None] - x) ** 2).sum(-1, dtype=F32)
    for step in range(nstep + 1):
        iscale = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span).astype(F32)
        aux = np.clip(np.rint(iscale[:, None] * shifted), 0, nmax)
        sum_l = (weights * aux).sum(-1, dtype=F32)
        sum_l2 = (weights * aux * aux).sum(-1, dtype=F32)
        sum_xl = (weights * aux * x).sum(-1, dtype=F32)
        det = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(F32)
            this_min = np.where(clamp, F32(0), this_min).astype(F32)
            err = (weights * (this_scale[:, None] * aux + this_min[:, None] - x) ** 2).sum(-1, dtype=F32)
        better = (det > 0) & (err < best)
        codes = np.where(better[:, None], aux, codes)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    codes = np.where(flat[:, None], 0, codes).astype(np.int32)
    return np.where(flat, F32(0), scale).astype(F32), (-low).astype(F32), codes


# ---- K-quant types ----------------------------------------------------------------------------------------


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes holding 8 six-bit scales and 8 six-bit mins (`get_scale_min_k4` reads them back)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _q45_k_codes(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared by Q4_K and Q5_K: 8 sub-blocks of 32 fitted with make_qkx2_quants, their scales and mins
    quantized to 6 bits against the block's largest, then every value re-quantized with those."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av_x = np.sqrt((sub * sub).sum(-1, dtype=F32) / F32(32)).astype(F32)
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, codes = make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins, codes = scales.reshape(nb, 8), mins.reshape(nb, 8), codes.reshape(nb, QK_K)
    max_scale = np.maximum(scales.max(-1), F32(0))
    max_min = np.maximum(mins.max(-1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0)).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0)).astype(F32)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales)).astype(np.int32)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins)).astype(np.int32)
    d, dmin = max_scale / F32(63), max_min / F32(63)
    sub_d = (_f16_value(d)[:, None] * ls).astype(F32)  # (nb, 8)
    sub_m = (_f16_value(dmin)[:, None] * lm).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.rint((sub.reshape(nb, 8, 32) + sub_m[..., None]) / sub_d[..., None])
    requant = np.clip(np.nan_to_num(requant), 0, nmax).reshape(nb, QK_K)
    codes = np.where(np.repeat(sub_d != 0, 32, axis=1), requant, codes).astype(np.int32)
    head = np.concatenate([_f16(d), _f16(dmin), _pack_scale_min_k4(ls, lm)], axis=-1)
    return head, codes


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    head, codes = _q45_k_codes(x, 15, -1.0, 0.1, 20)
    c = codes.reshape(-1, 4, 2, 32)  # per 64 values: the first 32 in low nibbles, the next 32 in high
    return np.concatenate([head, _nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)], axis=-1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    head, codes = _q45_k_codes(x, 31, -0.5, 0.1, 15)
    c = codes.reshape(-1, 4, 2, 32)
    high = (c >> 4) & 1  # 5th bits: qh[j] bit 2k for c[k, 0, j], bit 2k + 1 for c[k, 1, j]
    shifts = (np.arange(4)[:, None] * 2 + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high.astype(np.uint8) << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([head, qh, _nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128)], axis=-1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16 fitted with make_qx_quants(nmax 32); their scales as int8 against the largest
    (d = max_scale / -128), then every value re-quantized to [-32, 31] + 32."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, codes = make_qx_quants(sub, 32)
    scales, codes = scales.reshape(nb, 16), codes.reshape(nb, QK_K)
    max_scale = _first_absmax(scales)[:, 0]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = (F32(-128) / np.where(zero, F32(1), max_scale)).astype(F32)
    d = np.where(zero, F32(0), F32(1) / iscale).astype(F32)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int32)
    sub_d = (_f16_value(d)[:, None] * sc).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.rint(sub.reshape(nb, 16, 16) / sub_d[..., None])
    requant = np.clip(np.nan_to_num(requant), -32, 31).reshape(nb, QK_K) + 32
    codes = np.where(np.repeat(sub_d != 0, 16, axis=1), requant, codes).astype(np.int32)
    codes = np.where(zero[:, None], 0, codes)
    sc = np.where(zero[:, None], 0, sc)
    c = codes.reshape(nb, 2, 4, 32)  # per 128 values: four runs of 32
    ql = np.concatenate([_nibbles(c[:, :, 0], c[:, :, 2]), _nibbles(c[:, :, 1], c[:, :, 3])], axis=-1)
    qh = sum(((c[:, :, k] >> 4) & 3) << (2 * k) for k in range(4)).astype(np.uint8)
    return np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.astype(np.int8).view(np.uint8), _f16(d)], axis=-1
    )


QUANTIZERS = {
    "Q8_0": quantize_q8_0,
    "Q4_0": quantize_q4_0,
    "Q5_0": quantize_q5_0,
    "Q5_1": quantize_q5_1,
    "Q4_K": quantize_q4_k,
    "Q5_K": quantize_q5_k,
    "Q6_K": quantize_q6_k,
}


def quantize(tensor: np.ndarray, qtype: str) -> np.ndarray:
    """A float tensor (..., n) as ggml blocks of `qtype`: uint8 (..., n / block * bytes). n must be a
    multiple of the block size (see `fits`)."""
    block = BLOCK[qtype]
    x = np.ascontiguousarray(tensor, dtype=F32)
    if x.shape[-1] % block:
        raise ValueError(f"rows of {x.shape[-1]} values do not split into {qtype} blocks of {block}")
    blocks = QUANTIZERS[qtype](x.reshape(-1, block))
    return blocks.reshape(*x.shape[:-1], x.shape[-1] // block * BYTES[qtype])


def fits(n: int, qtype: str) -> bool:
    return n % BLOCK[qtype] == 0


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """Back to float32 through gguf-py's dequantizers (an implementation independent of the above)."""
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).astype(F32)
