"""Make a CPU process's resident memory follow its live tensors (glibc's malloc).

glibc serves an allocation above its mmap threshold with a fresh mapping that `free` returns to the system,
and everything below it from heaps that keep freed memory for reuse. The threshold starts at 128 KiB but is
dynamic: freeing a mapped block raises it to that block's size (up to 32 MiB), so after the first training
step the many (N, H) and (N, I) activation tensors of a few MiB come from the heaps, and the freed ones stay
resident. Measured on a 30M-parameter model (bench/memory.py): RSS after a step 490 MiB above the start
while 100 MiB of tensors were alive, and a peak 2.5x the peak of live tensors.

Setting the threshold explicitly (mallopt M_MMAP_THRESHOLD, or the MALLOC_MMAP_THRESHOLD_ environment
variable) turns the dynamic adjustment off (glibc manual, "Memory Allocation Tunables"); then RSS tracks live
tensors within a few MiB, which is what `cura.memory.planner` predicts. The cost is a page fault per 4 KiB of
each new large tensor (the kernel zeroes fresh pages).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value, now fixed


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold so freed large blocks go back to the system; False where not glibc."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
