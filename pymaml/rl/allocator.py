"""Keep freed memory in the process for reuse (glibc's malloc), for the batched RL passes.

A batched pass allocates tensors of megabytes ([T, K, 100] activations and their tangents: 6.4 MB
in float32 at T = 40, K = 400) and frees them again within one product. glibc serves a block that
large with a fresh mmap (above its dynamic mmap threshold) or hands the top of the heap back to
the kernel once more than the trim threshold is free, so each new tensor is faulted in page by
page, about as long as a batched matrix product over it takes. Raising both thresholds makes
freed blocks of up to MMAP_THRESHOLD come back from the heap already mapped. The cost: the
process keeps its peak heap mapped until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX): a larger value is refused.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Never hand the top of the heap back (the largest value mallopt takes, a C int).
TRIM_THRESHOLD = 2 ** 31 - 1

_retained = False


def retain_freed_memory() -> bool:
    """Set glibc's thresholds as above (once per process); whether they are set. False, changing
    nothing, where the C library is not glibc or refuses a value."""
    global _retained
    if _retained:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _retained = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _retained
