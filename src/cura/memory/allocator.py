"""Make a CPU process's resident memory follow its live tensors (glibc's malloc), when memory is tight.

glibc serves an allocation above its mmap threshold with a fresh mapping that `free` returns to the system,
and everything below it from heaps that keep freed memory for reuse. The threshold starts at 128 KiB but is
dynamic: freeing a mapped block raises it to that block's size (up to 32 MiB), so after the first training
step the many (N, H) and (N, I) activation tensors of a few MiB come from the heaps, and the freed ones stay
resident. Measured over the 18 configurations of bench/memory.py (bench/results/memory-fast.json): peak RSS
0.88x to 3.4x the planned peak of live tensors, and not reproducible from run to run (the bundled model with
float32 compute: 2.6 GiB in one run, 2.0 GiB in the next, 1.5 GiB against a 0.43 GiB plan in the last).

Setting the threshold explicitly (mallopt M_MMAP_THRESHOLD, or the MALLOC_MMAP_THRESHOLD_ environment
variable) turns the dynamic adjustment off (glibc manual, "Memory Allocation Tunables"); then RSS tracks live
tensors within a few MiB, which is what `cura.memory.planner` predicts (bench/results/memory-tight.json). The
cost is a page fault per 4 KiB of each new large tensor (the kernel zeroes fresh pages): on the bundled model
steps measured 1.35x to 1.7x slower (up to 1.9x on the tiny shapes; 3 steps each, bench/results/memory*.json).

cura's own CPU tensor pool (`cura.train.cpu_pool`, cpu_malloc "pool") is both: it keeps freed tensor blocks
for reuse, so steps map nothing, and holds at most the most ever alive at once + POOL_HEADROOM, a term of
the plan (bench/results/memory.json: 16 of 18 configurations within 4.1% of the plan, at 1.02-1.06x the
tight allocator's peak RSS and 0.42-0.69x its step time). So `cura train` chooses per run (`cpu_malloc`):
"pool" where it builds, the default ("auto"); otherwise "tight" fixes glibc's threshold, "fast" keeps glibc's
default, and "auto" without the pool is fast unless FAST_RETENTION x the plan would not fit in the memory
available now.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value, now fixed

FAST_RETENTION = 3.5
"""Peak RSS with glibc's default malloc, as a multiple of the planned peak: the worst measured was 3.41x
(bench/memory.py --malloc fast, the bundled model with float32 compute; 2.86x and 2.59x in earlier runs)."""


POOL_HEADROOM = 0.05
"""cura's CPU pool holds the most ever alive at once plus this part of it (cached blocks whose size the next
request does not take); the plan counts it as a term, and `cura train` caps the pool at the plan's tensors.
Measured with it (bench/results/memory.json): peak RSS 1.02-1.06x the tight allocator's, at 0.74-1.01x the
step time of glibc's default."""


def pool_headroom(tensor_bytes: int) -> int:
    """The plan's term for cura's CPU pool: POOL_HEADROOM of the tensors alive at the peak."""
    return int(POOL_HEADROOM * tensor_bytes)


def fast_malloc_bound(planned_peak: int) -> int:
    """The most a CPU run with glibc's default malloc (cpu_malloc=fast) is allowed for: FAST_RETENTION x plan."""
    return int(FAST_RETENTION * planned_peak)


def pin_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold so freed large blocks go back to the system; False where not glibc."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable); None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class MallocChoice:
    tight: bool
    why: str


def choose_malloc(mode: str, planned_peak: int | None, available: int | None) -> MallocChoice:
    """Tight or fast for a CPU run: `mode` is the config's cpu_malloc ("auto", "fast", "tight");
    `planned_peak` the plan's peak in bytes (None when the model's shape is unknown); `available` the free
    memory in bytes (None when unknown)."""
    if mode in ("tight", "fast"):
        return MallocChoice(mode == "tight", f"cpu_malloc={mode} (set)")
    if planned_peak is None or available is None:
        return MallocChoice(False, "cpu_malloc=auto: fast (no plan or no memory figure to check against)")
    gib = 2**30
    bound = fast_malloc_bound(planned_peak)
    if bound <= available:
        return MallocChoice(
            False,
            f"cpu_malloc=auto: fast (even {FAST_RETENTION:g}x the planned {planned_peak / gib:.2f} GiB fits in "
            f"{available / gib:.1f} GiB available)",
        )
    return MallocChoice(
        True,
        f"cpu_malloc=auto: tight, freed tensors go back to the system so memory follows the plan "
        f"({planned_peak / gib:.2f} GiB; glibc's default could hold up to {bound / gib:.1f} GiB, more than the "
        f"{available / gib:.1f} GiB available); steps can be up to 1.9x slower, set cpu_malloc=fast to skip it",
    )
