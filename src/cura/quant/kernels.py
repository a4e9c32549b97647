"""CPU fast path of the 4-bit format: `kernels.c`, compiled on first use and called through ctypes.

The PyTorch functions of `cura.quant.blockwise` stay the reference; every function here returns the same
bits (bytes, absmax, values) or ``None``, and then the caller runs the reference. ``None`` when:

- ``CURA_KERNELS=0`` is set (read at each call), or a tensor is not on the CPU;
- no C compiler, or the build fails, or the loaded library fails its self-check (logged once at debug
  level; the reference is then used for the rest of the process);
- the data is not finite (NaN / inf in the weight or its scales: the reference's rounding of those is
  not reproduced in C).

Build (on the first quantize / dequantize on CPU, never at import)::

    $CC (or cc) -O3 -march=native -ffp-contract=off -fopenmp -shared -fPIC kernels.c
      -> <cache>/kernels/<sha256(source, flags, compiler, cpu)>.so      (about 1 s, once per machine)

``<cache>`` is ``$CURA_CACHE``, else ``$XDG_CACHE_HOME/cura``, else ``~/.cache/cura``. The library is
written under a temporary name and renamed into place, so processes that build at the same time never
load a half-written file. Without OpenMP (``-fopenmp`` rejected) it is built single-threaded. With
OpenMP it shares PyTorch's runtime where PyTorch ships libgomp (the same ``libgomp.so.1``), and uses
``torch.get_num_threads()`` threads.
"""

import ctypes
import hashlib
import logging
import mmap
import os
import platform
import shlex
import shutil
import subprocess
import threading
from functools import cache
from pathlib import Path

import torch

from cura.atomic import atomic_file
from cura.constants import DEFAULT_BLOCKSIZE, QUANT_TYPES
from cura.quant.blockwise import sorted_bounds
from cura.quant.codebooks import code_4bit

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
ABI = 2
"""Must equal ``CURA_ABI`` in kernels.c."""

BASE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native",), ("-fopenmp",), ())
"""Tried in order until one builds: for this CPU with threads, then without OpenMP (e.g. Apple clang), then
for the compiler's default target (a compiler that rejects -march=native)."""

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

MIN_ELEMENTS_PER_THREAD = 1 << 16
"""Below this many elements per thread the work runs on one thread (waking a thread costs ~10 us)."""

_lock = threading.Lock()


def enabled() -> bool:
    """False when ``CURA_KERNELS=0``: every caller then runs the PyTorch reference."""
    return os.environ.get("CURA_KERNELS", "1") != "0"


def cache_dir() -> Path:
    base = os.environ.get("CURA_CACHE")
    if base:
        return Path(base) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) / "cura" if xdg else Path.home() / ".cache" / "cura") / "kernels"


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keys}))


def build(flags: tuple[str, ...]) -> Path:
    """Compile kernels.c with `flags` into the cache (reusing a previous build); returns the library path.

    Raises OSError / subprocess.CalledProcessError when there is no compiler or the build fails.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler found (set CC or install cc / gcc)")
    return build_library(SOURCE, [*shlex.split(compiler), *BASE_FLAGS, *flags], _cpu_id())


def build_library(
    source: Path, command: list[str], depends_on: str = "", *, link: tuple[str, ...] = (), suffix: str = ""
) -> Path:
    """``command -o <library> <source> link...`` into the cache, unless a build of the same source, command and
    `depends_on` (what else the binary depends on: the CPU for -march=native, a library's version) is there;
    returns the library's path. Written under a temporary name and renamed into place, so processes that
    build at the same time never load a half-written file. Raises OSError / subprocess.SubprocessError."""
    line = " ".join([*command, *link]).encode()
    key = hashlib.sha256(b"\0".join([source.read_bytes(), line, depends_on.encode()]))
    target = cache_dir() / f"{key.hexdigest()[:24]}{suffix}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target, mode=0o777) as tmp:  # a racing process sees no library or a whole one
        subprocess.run(
            [*command, "-o", str(tmp), str(source), *link],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    return target


def load(path: Path) -> ctypes.CDLL:
    """Open a built library and declare its functions' C signatures."""
    lib = ctypes.CDLL(str(path))
    if lib.cura_abi() != ABI:
        raise OSError(f"{path} has ABI {lib.cura_abi()}, expected {ABI}")
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.cura_dequantize_4bit.argtypes = [p, i64, i64, p, p, p, p, p, f32, i64, p, i32, i32]
    lib.cura_quantize_4bit.argtypes = [p, i32, i64, i64, p, p, i32, p, p, i32]
    lib.cura_quantize_8bit.argtypes = [p, i64, i64, p, p, p, p, i32]
    u32 = ctypes.c_uint32
    lib.cura_dropout.argtypes = [p, p, i32, i64, u32, u32, u32, f32, i32]
    for fn in (lib.cura_dequantize_4bit, lib.cura_quantize_4bit, lib.cura_quantize_8bit, lib.cura_dropout):
        fn.restype = ctypes.c_int
    return lib


def _build_and_load() -> ctypes.CDLL | None:
    errors = []
    for flags in FLAG_SETS:
        name = " ".join(flags) or "portable"
        try:
            lib = load(build(flags))
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or err
            errors.append(f"{name}: {str(detail).strip()[-300:]}")
            continue
        mismatch = self_check(lib)
        if mismatch is None:
            return lib
        errors.append(f"{name}: differs from the reference on {mismatch}")
    log.debug("cura CPU kernels unavailable, using the PyTorch reference: %s", "; ".join(errors))
    return None


_loaded: list[ctypes.CDLL | None] = []
"""Empty until the first use, then [the library, or None when it could not be built]."""


def library() -> ctypes.CDLL | None:
    """The CPU kernels, built and self-checked on first use; None when disabled or unavailable."""
    if not enabled():
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.append(_build_and_load())
    return _loaded[0]


def library_for(t: torch.Tensor) -> ctypes.CDLL | None:
    """`library()` for a CPU tensor, None for any other device (its work stays on the PyTorch path)."""
    return library() if t.device.type == "cpu" else None


def self_check(lib: ctypes.CDLL) -> str | None:
    """Compare `lib` with the reference on a small probe (both books, each input and output dtype, double
    quantization, exact ties, an odd size with a short last block); returns what differed, or None.
    Guards against a compiler that does not keep IEEE float32 rounding."""
    from cura.quant.tensor import dequantize_with, quantize_with  # deferred: tensor.py imports this module

    for quant_type in QUANT_TYPES:
        for input_dtype in DTYPE_CODES:
            w = _probe(code_4bit(quant_type)).to(input_dtype)
            fast, ref = (quantize_with(k, w, quant_type, DEFAULT_BLOCKSIZE, True) for k in (lib, None))
            same = (fast.packed, fast.absmax, fast.nested_absmax), (ref.packed, ref.absmax, ref.nested_absmax)
            if not all(torch.equal(a, b) for a, b in zip(*same)):
                return f"quantize {quant_type} from {input_dtype}"
            for dtype in DTYPE_CODES:
                if not torch.equal(dequantize_with(lib, ref, dtype), dequantize_with(None, ref, dtype)):
                    return f"dequantize {quant_type} to {dtype}"
    return None


def _probe(code: torch.Tensor) -> torch.Tensor:
    """789 random values whose second block holds 1.0 and every midpoint of `code` (exact ties)."""
    probe = torch.randn(3 * 256 + 21, generator=torch.Generator().manual_seed(0))
    values = code.sort().values
    ties = torch.cat([torch.ones(1), (values[:-1] + values[1:]) / 2])
    probe[64:128] = 0.0
    probe[64 : 64 + ties.numel()] = ties
    return probe


LARGE_OUTPUT_BYTES = 32 << 20
"""Outputs of at least this many bytes go to transparent huge pages (see `empty`)."""

HUGE_PAGE = 2 << 20


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(n, dtype=dtype)``, but a large one on 2 MiB pages where Linux allows it.

    glibc maps every allocation above 32 MiB (its largest mmap threshold) afresh, and the first write to
    each 4 KiB page then faults and zeroes it: for a 64 MiB dequantization that is 16384 faults, measured
    here at about 3x the decoding time itself. An anonymous mapping with ``madvise(MADV_HUGEPAGE)`` (the
    "madvise" THP mode, the common default) faults once per 2 MiB. The tensor owns the mapping (through
    ``torch.frombuffer``) and unmaps it when freed; only its storage cannot be resized.
    """
    nbytes = n * dtype.itemsize
    if nbytes < LARGE_OUTPUT_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, dtype=dtype)
    try:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE  # 2 MiB-aligned start
        region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % HUGE_PAGE)
    except (OSError, ValueError):  # no THP in this kernel, or no address space: ordinary pages
        return torch.empty(n, dtype=dtype)
    return torch.frombuffer(region, dtype=dtype, count=n, offset=start)


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // MIN_ELEMENTS_PER_THREAD))


def threads_for(n: int) -> int:
    """Threads for a kernel over `n` elements: torch's count, fewer when each would get too little."""
    return _threads(n)


def _on_cpu(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.reshape(-1).to(dtype).contiguous()


def _sorted_book(code: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted book padded with +inf to `size`, and sorted index -> code (int32)."""
    bounds, order = sorted_bounds(code.float())
    padded = torch.full((size,), float("inf"))
    padded[: bounds.numel()] = bounds
    index = torch.zeros(size, dtype=torch.int32)
    index[: code.numel()] = torch.arange(code.numel()) if order is None else order
    return padded, index


@cache
def _book(values: tuple[float, ...], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _sorted_book(torch.tensor(values, dtype=torch.float32), size)


def quantize_4bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int, lib: ctypes.CDLL | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quantize_blocks(x, code, blocksize)` + `pack_nibbles` in one pass: ``(packed, absmax)`` or None."""
    if (
        lib is None
        or not _on_cpu(x, code)
        or x.dtype not in DTYPE_CODES
        or code.numel() != 16
        or blocksize < 2
        or blocksize % 2
    ):
        return None
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    bounds, order = _book(tuple(code.tolist()), 16)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    pad_code = int(code.abs().argmin())
    bad = lib.cura_quantize_4bit(
        flat.data_ptr(), DTYPE_CODES[x.dtype], n, blocksize, bounds.data_ptr(), order.data_ptr(),
        pad_code, packed.data_ptr(), absmax.data_ptr(), _threads(n),
    )  # fmt: skip
    return None if bad else (packed, absmax)


def quantize_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int, lib: ctypes.CDLL | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`quantize_blocks(x, code, blocksize, divide=True)` for a 256-entry book: ``(codes, absmax)`` or None."""
    if lib is None or not _on_cpu(x, code) or code.numel() != 256 or blocksize < 1:
        return None
    flat = _contiguous(x, torch.float32)
    n = flat.numel()
    bounds, order = _book(tuple(code.tolist()), 256)
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    bad = lib.cura_quantize_8bit(
        flat.data_ptr(), n, blocksize, bounds.data_ptr(), order.data_ptr(), codes.data_ptr(),
        absmax.data_ptr(), _threads(n),
    )  # fmt: skip
    return None if bad else (codes, absmax)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    nested: tuple[torch.Tensor, torch.Tensor, float, int] | None,
    out: torch.Tensor,
    lib: ctypes.CDLL | None,
) -> torch.Tensor | None:
    """Decode `n` packed 4-bit codes into `out` (contiguous float32 / bfloat16 / float16, n elements).

    `absmax` is float32 [blocks], or with double quantization uint8 [blocks] and
    ``nested = (nested_absmax, nested_code, offset, nested_blocksize)``. Returns `out`, or None (then
    `out` holds nothing useful and the caller runs the reference).
    """
    nested_absmax, nested_code, offset, nested_blocksize = nested or (None, None, 0.0, 1)
    if (
        lib is None
        or not _on_cpu(packed, absmax, code, nested_absmax, nested_code, out)
        or out.dtype not in DTYPE_CODES
        or not out.is_contiguous()
        or out.numel() != n
        or blocksize < 2
        or blocksize % 2
        or packed.numel() * packed.element_size() < (n + 1) // 2
        or absmax.numel() < -(-n // blocksize)
        or absmax.dtype != (torch.uint8 if nested else torch.float32)
        or code.numel() != 16
    ):
        return None
    flat = packed.reshape(-1)
    flat = (flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).contiguous()
    book = _contiguous(code, torch.float32)
    if nested:
        if (
            nested_blocksize < 1
            or nested_absmax.numel() < -(-absmax.numel() // nested_blocksize)
            or nested_code.numel() != 256
        ):
            return None
        nested_absmax = _contiguous(nested_absmax, torch.float32)
        nested_code = _contiguous(nested_code, torch.float32)
    absmax = absmax.reshape(-1).contiguous()
    bad = lib.cura_dequantize_4bit(
        flat.data_ptr(), n, blocksize, book.data_ptr(),
        None if nested else absmax.data_ptr(), absmax.data_ptr() if nested else None,
        _ptr(nested_absmax), _ptr(nested_code), offset, nested_blocksize,
        out.data_ptr(), DTYPE_CODES[out.dtype], _threads(n),
    )  # fmt: skip
    return None if bad else out
