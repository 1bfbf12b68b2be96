"""Keeping freed memory in the process, so a CPU step's large temporaries reuse warm pages.

Why: a prefill step of 16 prompts allocates activations of several MB per layer (a
1,542-row gate/up output is 19 MB) and frees them a moment later. glibc serves such sizes
with a fresh `mmap` and returns them with `munmap` (or trims them off the heap top), so the
next layer's output page-faults every 4 KB page again and the kernel zeroes each one: perf
put 4% of a prefill step in `clear_page_erms`, inside the GEMM tile that first writes the
output. With freed blocks kept, the same pages are reused. Measured 2026-12-04 on a 2-vCPU
Intel Xeon (avx512_vnni; `TOKENMILL_CPU_ISA=avx2 python benchmarks/bench_waves.py
--waves 4`, run alternately with and without `MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824`, the settings below): waves of 426-442 tok/s against
405-424, prefill steps of 1,061-1,084 ms against 1,071-1,168.

The cost is memory the process keeps after a peak instead of returning it: at most the
largest step's temporaries (some tens of MB with the default 2,048-token step budget).
glibc's own environment variables (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`)
take precedence: a user who set either gets exactly what they asked for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): blocks up to it
# come from the heap and are reused once freed.
MMAP_THRESHOLD = 32 << 20
# Free memory at the heap's top that glibc keeps rather than returning to the kernel.
TRIM_THRESHOLD = 1 << 30

_ENV_OVERRIDES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True if they were set.

    False (and nothing changed) where the C library is not glibc or where the user set
    glibc's own variables; the reason is logged either way."""
    overridden = [name for name in _ENV_OVERRIDES if name in os.environ]
    if overridden:
        log.info("heap tuning: left to %s from the environment", ", ".join(overridden))
        return False
    libc = _glibc()
    if libc is None:
        log.info("heap tuning: not glibc; freed memory goes back to the system as usual")
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD
    )
    if not ok:
        log.warning("heap tuning: glibc refused mallopt; large temporaries page-fault each step")
    return bool(ok)


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
