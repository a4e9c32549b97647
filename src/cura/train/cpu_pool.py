"""cura's CPU tensor pool (`cpu_malloc: pool`, what `auto` picks where it builds): a caching allocator for
PyTorch's CPU tensors, so that a training process's memory follows the plan at the speed of glibc's default.

A training step allocates and frees the same tensors every step. glibc's default malloc keeps freed blocks
in its heaps: fast, but resident memory measured 0.9-3.4x the live tensors, and not reproducible from run to
run. With its mmap threshold fixed (`cpu_malloc: tight`) every large block is mapped and unmapped, so memory
follows the live tensors, but every step faults each page in again (steps 1.35-1.9x slower). The pool
(`cpu_pool.cpp`) keeps the freed blocks of 128 KiB and more for reuse (best fit, at most 1.25x the request),
so after the first step a step maps nothing, and it holds (live tensors + cached blocks) at most the most
ever alive at once + `HEADROOM` (5%): cached blocks are unmapped before the total would pass that. The plan
counts that headroom (its "allocator headroom" term), and `cura train` also caps the pool at the plan's
tensors (`pool_limit`), so resident memory follows the plan wherever the plan is right; where the plan is
short only the live tensors themselves go beyond it.

Built on first use, like the 4-bit kernels (`cura.quant.kernels`), and loaded with ctypes::

    $CXX (or c++ / g++ / clang++) -O2 -std=c++17 -shared -fPIC -D_GLIBCXX_USE_CXX11_ABI=<torch's>
        -I<torch>/include -o <cache>/kernels/<hash>-pool.so cpu_pool.cpp -L<torch>/lib -lc10
        -Wl,-rpath,<torch>/lib                                           (about 1 s, once per torch version)

`install(limit)` makes it PyTorch's CPU allocator (``c10::SetCPUAllocator``) for the rest of the process:
tensors allocated before keep their own deleter, so nothing is freed by the wrong allocator. Where it cannot
be built or loaded (no C++ compiler, no torch headers, not Linux or macOS), `buildable` / `install` say why
in a few words and `cura train` falls back to glibc (`cura.train.autofit.apply_cpu_malloc`).

Torch-free until `install` (`buildable` answers for `cura estimate`, which loads no torch).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from cura.memory.allocator import POOL_HEADROOM

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_pool.cpp")
ABI = 3
"""Must equal ``CURA_POOL_ABI`` in cpu_pool.cpp."""

MIN_BYTES = 128 << 10
"""Requests below this size go to the allocator the pool replaced (PyTorch's default, glibc's heaps, which
serve them without mapping: glibc's own mmap threshold starts at 128 KiB)."""

SLACK = 1.25
"""A cached block serves a request of at least 1 / SLACK of its size (batches of varying length reuse blocks)."""

HEADROOM = POOL_HEADROOM
"""The pool holds at most the most ever alive at once plus this part of it (cached blocks of other sizes than
the next request needs); the plan counts it (its "allocator headroom" term)."""


@dataclass(frozen=True)
class PoolStats:
    """Bytes and counts of the pool since it was installed (peaks since the last `reset_peaks`)."""

    live: int  # bytes of tensors alive in pool blocks
    cached: int  # bytes of freed blocks kept for reuse
    peak_live: int
    peak_held: int  # live + cached
    hits: int  # requests served from the cache
    maps: int  # blocks mapped from the system
    unmaps: int  # blocks returned to the system
    over_limit: int  # blocks mapped while live tensors alone passed the limit
    high_live: int  # the most ever alive at once (not reset by `reset_peaks`)


_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, "limit": the installed limit, "error": why it failed


def compiler() -> list[str] | None:
    """The C++ compiler command: $CXX, else the first of c++, g++, clang++ on PATH."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    return [found] if found else None


def torch_dirs() -> tuple[Path, Path] | None:
    """torch's include and lib folders, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0])
    include, lib = root / "include", root / "lib"
    if not (include / "c10" / "core" / "CPUAllocator.h").exists() or not lib.is_dir():
        return None
    return include, lib


def buildable() -> str | None:
    """None where the pool can be built here, else why not (a few words). Cheap and torch-free: it looks
    for a compiler and torch's headers; the build itself may still fail (then `install` says so)."""
    if os.environ.get("CURA_CPU_POOL", "1") == "0":
        return "CURA_CPU_POOL=0 is set"
    if platform.system() not in ("Linux", "Darwin"):
        return f"not on {platform.system()}"
    if _state.get("error"):
        return _state["error"]
    if compiler() is None:
        return "no C++ compiler (set CXX or install g++ / clang++)"
    if torch_dirs() is None:
        return "this torch has no C++ headers"
    return None


def build() -> Path:
    """Compile cpu_pool.cpp against this torch into the cache (reusing a previous build); the library's path.
    Raises OSError / subprocess.SubprocessError."""
    import torch

    from cura.quant.kernels import build_library

    cxx, dirs = compiler(), torch_dirs()
    if cxx is None or dirs is None:
        raise OSError(buildable() or "no compiler or torch headers")
    include, lib = dirs
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    command = [
        *cxx,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{include}",
    ]
    link = (f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}")
    return build_library(SOURCE, command, torch.__version__, link=link, suffix="-pool")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    if lib.cura_pool_abi() != ABI:
        raise OSError(f"the built pool has ABI {lib.cura_pool_abi()}, expected {ABI}")
    lib.cura_pool_install.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_double, ctypes.c_double]
    lib.cura_pool_install.restype = ctypes.c_int
    lib.cura_pool_stats.argtypes = [ctypes.c_void_p]
    lib.cura_pool_stats.restype = ctypes.c_int
    return lib


def install(limit: int | None) -> str | None:
    """Make the pool PyTorch's CPU allocator for this process, holding at most `limit` bytes (None: no
    limit); a second call changes the limit. None when installed, else why not (a few words; the process
    keeps its allocator)."""
    reason = buildable()
    if reason is not None:
        return reason
    with _lock:
        try:
            lib = _state.get("lib") or _load()
        except (OSError, subprocess.SubprocessError) as err:
            detail = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
            log.debug("cura's CPU pool could not be built: %s", "\n".join(detail))
            _state["error"] = "its build failed" + (f" ({detail[-1][:200]})" if detail else "")
            return _state["error"]
        if lib.cura_pool_install(MIN_BYTES, int(limit or 0), SLACK, HEADROOM) != 0:
            _state["error"] = "torch kept another CPU allocator"
            return _state["error"]
        _state["lib"], _state["limit"] = lib, limit
    return None


def installed() -> bool:
    return "lib" in _state


def limit() -> int | None:
    """The installed pool's limit in bytes (None: no limit, or no pool)."""
    return _state.get("limit")


def stats() -> PoolStats | None:
    """The pool's counters, or None where it is not installed."""
    lib = _state.get("lib")
    if lib is None:
        return None
    values = (ctypes.c_longlong * 9)()
    lib.cura_pool_stats(values)
    return PoolStats(*values)


def reset_peaks() -> None:
    if "lib" in _state:
        _state["lib"].cura_pool_reset_peaks()


def empty_cache() -> None:
    """Return every cached block to the system (live tensors keep theirs)."""
    if "lib" in _state:
        _state["lib"].cura_pool_empty_cache()


def pool_limit(tensor_bytes: int | None, available: int | None) -> int | None:
    """The limit `cura train` installs: the plan's tensor bytes, its allocator headroom included (the peak
    without the framework's overhead); without a plan, half the memory available; None when neither is
    known."""
    if tensor_bytes is not None:
        return tensor_bytes
    return available // 2 if available else None
