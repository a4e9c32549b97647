"""Blockwise absmax quantization, 4-bit packing and their inverses: pure functions on tensors.

Bit layout (bitsandbytes 0.50.2, byte for byte)::

    x (any shape, numel n)  -> flat[n] -> blocks of `blocksize` (the last one may be short)
    absmax[b]  = max |x| over block b                              (float32)
    code[i]    = index of the nearest entry of `code_book` to x[i] * (1 / absmax[b]), clamped to [-1, 1]
                 (ties go to the lower entry of the sorted book: torch.bucketize on the midpoints)
    packed[j]  = code[2j] << 4 | code[2j + 1]                      (uint8, shape [ceil(n / 2), 1]; an odd n
                 is padded with one zero value)

An all-zero full block keeps absmax 0 (and the code of 0.0); like bitsandbytes, a short last block divides
by ``max(absmax, 1e-38)`` and stores that clamped value.

Double quantization is the same `quantize_blocks` applied to ``absmax - mean(absmax)`` with the 256-entry
signed dynamic map and blocksize 256 (no packing: one uint8 per absmax).
"""

import torch

_CHUNK_ELEMENTS = 1 << 20
"""Elements quantized at once: bounds the float32 temporaries of `quantize_blocks` to a few MiB."""


def sorted_bounds(code_book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Midpoints between neighbours of the sorted code book, and the sort order (sorted index -> code),
    None when the book is already sorted (NF4, the dynamic map)."""
    order = torch.argsort(code_book, stable=True)
    values = code_book[order]
    identity = bool(torch.equal(order, torch.arange(order.numel(), device=order.device)))
    return (values[:-1] + values[1:]) / 2, None if identity else order


def _nearest_codes(scaled: torch.Tensor, bounds: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    index = torch.bucketize(scaled, bounds, out_int32=True)
    return (index if order is None else order[index]).to(torch.uint8)


def quantize_blocks(
    x: torch.Tensor, code_book: torch.Tensor, blocksize: int, *, divide: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``x.flatten()`` to indices into `code_book` (nearest, ties low).

    Returns ``(codes, absmax)``: uint8 ``[n]`` (one code per element) and float32 ``[ceil(n / blocksize)]``.
    Two roundings, each matching the bitsandbytes CPU kernel it stands for:

    - ``divide=False`` (its 4-bit kernel): full blocks use ``x * (1 / max(absmax, 1e-38))``; a short last
      block uses ``x / max(absmax, 1e-38)`` and stores that clamped absmax.
    - ``divide=True`` (its 8-bit C kernel, used for double quantization): ``x / absmax``; an all-zero block
      keeps absmax 0 and gets code 0 (0 / 0 is NaN there, which its search sends to index 0).

    Works in chunks of whole blocks so that temporaries stay small whatever the size of `x`.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    bounds, order = sorted_bounds(code_book.to(device=x.device, dtype=torch.float32))
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // blocksize) * blocksize
    for start in range(0, n, step):
        part = flat[start : start + step].float()
        full = part.numel() - part.numel() % blocksize
        first_block = start // blocksize
        if full:
            blocks = part[:full].view(-1, blocksize)  # (B, blocksize)
            block_max = blocks.abs().amax(dim=1)  # (B,)
            absmax[first_block : first_block + full // blocksize] = block_max
            if divide:
                scaled = blocks / block_max.unsqueeze(1)
            else:
                scaled = (blocks * (1.0 / block_max.clamp(min=1e-38)).unsqueeze(1)).clamp_(-1, 1)
            codes[start : start + full] = _nearest_codes(scaled.view(-1), bounds, order)
        if full < part.numel():  # the short last block
            tail = part[full:]
            tail_max = tail.abs().amax()
            if not divide:
                tail_max = tail_max.clamp(min=1e-38)
            absmax[-1] = tail_max
            codes[start + full :] = _nearest_codes((tail / tail_max).clamp_(-1, 1), bounds, order)
    if divide:
        zero_blocks = absmax == 0
        if zero_blocks.any():
            padded = torch.zeros(absmax.numel() * blocksize, dtype=torch.uint8, device=x.device)
            padded[:n] = codes
            padded.view(-1, blocksize)[zero_blocks] = 0
            codes = padded[:n].clone()
    return codes, absmax


def dequantize_blocks(
    codes: torch.Tensor, absmax: torch.Tensor, code_book: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Inverse of `quantize_blocks`: ``code_book[codes[i]] * absmax[i // blocksize]`` as float32 ``[n]``."""
    out = code_book.to(device=codes.device, dtype=torch.float32)[codes.reshape(-1).long()]
    return _scale_by_block(out, absmax, blocksize, out.numel())


def pack_nibbles(codes: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Two 4-bit codes per byte, the even element in the high nibble: uint8 ``[ceil(n / 2), 1]``.

    An odd count is padded with `pad_code` (bitsandbytes pads with the code of 0.0: 7 for NF4, 0 for FP4).
    """
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: the first `n` 4-bit codes as uint8 ``[n]``."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]


def pair_table(code_book: torch.Tensor) -> torch.Tensor:
    """Byte -> (value of high nibble, value of low nibble): float32 ``[256, 2]``."""
    byte = torch.arange(256, device=code_book.device)
    return torch.stack([code_book[byte >> 4], code_book[byte & 0xF]], dim=1).float().contiguous()


def quad_table(code_book: torch.Tensor) -> torch.Tensor:
    """Little-endian uint16 (two packed bytes) -> the 4 values they hold: float32 ``[65536, 4]`` (1 MiB),
    so one lookup decodes four elements."""
    word = torch.arange(65536, device=code_book.device)
    pairs = pair_table(code_book)
    return torch.cat([pairs[word & 0xFF], pairs[word >> 8]], dim=1).contiguous()


_DEQUANT_CHUNK = 1 << 15
"""Elements decoded per step of `dequantize_packed`: 128 KiB of float32, still in cache when its block
scales are applied, and at torch's parallel grain size (32768), so each op runs serially. Measured on a
shared 2-core machine: chunks of 65536..262144 elements under 2 OpenMP threads were 10-20x slower (thread
contention in hundreds of small parallel regions); 32768 stayed within 1.5x of the single-thread time."""


def dequantize_packed(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    blocksize: int,
    n: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode packed 4-bit codes with a `quad_table` and scale each block by its float32 absmax.

    Returns float32 ``[n]`` (written into `out` when given: contiguous float32 with n elements). Per
    cache-sized chunk: widen uint16 words to int32, gather 4 values per word (``table[word]``), multiply
    each block in place by its absmax. The last ``n % 4`` elements are decoded from their bytes alone.
    """
    flat = packed.reshape(-1)
    flat = flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    if flat.storage_offset() % 2:
        flat = flat.clone()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=flat.device)
    elif out.dtype != torch.float32 or out.numel() != n or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of {n} elements, got {out.dtype} {tuple(out.shape)}."
        )
    out = out.view(-1)
    n_words = n // 4  # whole 16-bit words (4 elements each) inside the first n elements
    words = flat[: 2 * n_words].view(torch.uint16)
    # Note: the gather moves each word's 4 float32 values as ONE 16-byte element (a complex128 view):
    # 1-D index_select of wide scalars is ~4x faster on CPU than gathering rows of a [65536, 4] table.
    wide_table = table.view(torch.complex128).view(-1)  # (65536,)
    wide_out = out[: 4 * n_words].view(torch.complex128)  # (n_words,)
    chunk = max(blocksize, _DEQUANT_CHUNK)
    index = torch.empty(min(chunk // 4, n_words), dtype=torch.int32, device=flat.device)
    for start in range(0, 4 * n_words, chunk):
        stop = min(start + chunk, 4 * n_words)
        word_index = index[: (stop - start) // 4]
        word_index.copy_(words[start // 4 : stop // 4])
        torch.index_select(wide_table, 0, word_index, out=wide_out[start // 4 : stop // 4])
        first, last = start // blocksize, stop // blocksize  # whole blocks inside this chunk
        if last > first:
            out[first * blocksize : last * blocksize].view(-1, blocksize).mul_(
                absmax[first:last].unsqueeze(1)
            )
    if 4 * n_words < n:  # 1..3 trailing elements: their 1 or 2 bytes through the byte-pair half of the table
        rest = table[flat[2 * n_words :].long(), :2].reshape(-1)
        out[4 * n_words :] = rest[: n - 4 * n_words]
    full = 4 * n_words - (4 * n_words) % blocksize  # blocks not yet scaled start here
    if full < n:
        _scale_by_block(out[full:], absmax[full // blocksize :], blocksize, n - full)
    return out


def _scale_by_block(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    full = n - n % blocksize
    if full:
        values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    if full < n:
        values[full:n].mul_(absmax[full // blocksize])
    return values[:n]
