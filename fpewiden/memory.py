"""Process memory behaviour for the steps whose peak is the product (calibrated conversion).

glibc's malloc serves a block of at least M_MMAP_THRESHOLD bytes with its own mapping, returned to the system when
freed; but once such a block is freed it raises the threshold to that block's size (up to 32 MiB), so later
blocks of a few MiB come from the heap and stay resident after they are freed. Calibration allocates and frees
tensors of a few MiB per token chunk, per pair: with the dynamic threshold a 2048→5632→2048 pair on 16,393 tokens
peaked at 956 MB net, with the threshold fixed at 1 MiB at 738 MB (bench/results/calibration_memory).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD = 1 << 20


@functools.cache
def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB for this process (once); False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
