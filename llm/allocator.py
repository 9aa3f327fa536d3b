"""Keep freed memory in the process: glibc's malloc is told not to hand large blocks back to the OS.

A training step allocates and frees the same large blocks every time (the tiny preset's logits
alone are 16 x 256 x 8192 floats, 134 MB). glibc serves each block over 32 MB with its own mmap and
unmaps it on free, and trims the heap when its top is free; the next step then faults every page
back in, zeroed by the kernel. Measured on a 2-core AVX2 EPYC: ~46k page faults a second, most CPU
time in the kernel, and a 128 MB allocate-and-touch at 148 ms instead of 27 ms. With mmap off
(M_MMAP_MAX=0) and trimming off (M_TRIM_THRESHOLD huge), the heap keeps its high-water mark and
reuses it: the process's resident memory stays at its peak instead of breathing each step.

Importing `llm` calls `keep_freed_memory()` once, so every way in (make run, dvc repro, the Prefect
flows, torchrun workers, the server, the tests) gets it. It is a no-op where the C library is not
glibc, and LLM_KEEP_FREED_MEMORY=0 turns it off (to measure the difference: bench/pretrain.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1        # glibc's malloc.h: mallopt's parameter numbers
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
TRIM_NEVER = 2**31 - 1       # an int: mallopt takes one (2 GiB of free heap top before a trim)
GLIBC_MMAP_MAX = 65536       # glibc's defaults
GLIBC_TRIM_THRESHOLD = 128 * 1024

ENV = "LLM_KEEP_FREED_MEMORY"
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming, in this process (and so in
    what it forks). True when applied; False where it does not apply (not glibc, or turned off)."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def return_freed_memory(mmap_threshold: int = 64 * 1024) -> bool:
    """The opposite, for measuring memory (bench/attention_cost.py): every block of mmap_threshold
    bytes or more is its own mapping, returned to the OS when freed, so the peak resident size is
    what was live, not the heap's high-water mark. glibc by default raises that threshold after the
    first large free and serves later blocks from the heap, whose holes inflate the peak."""
    return _mallopt({M_MMAP_MAX: GLIBC_MMAP_MAX, M_MMAP_THRESHOLD: mmap_threshold,
                     M_TRIM_THRESHOLD: GLIBC_TRIM_THRESHOLD})


def _apply() -> bool:
    if os.environ.get(ENV, "1") == "0":
        return False
    return _mallopt({M_MMAP_MAX: 0, M_TRIM_THRESHOLD: TRIM_NEVER})


def _mallopt(settings: dict[int, int]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in settings.items()])
