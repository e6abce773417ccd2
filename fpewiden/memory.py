"""Process memory behaviour for the steps whose peak is the product (calibrated conversion).

glibc's malloc serves a block of at least M_MMAP_THRESHOLD bytes with its own mapping, returned to the system when
freed; but once such a block is freed it raises the threshold to that block's size (up to 32 MiB), so later
blocks of a few MiB come from the heap and stay resident after they are freed, wherever a longer-lived tensor was
allocated above them. Calibration allocates and frees tensors of a few MiB per token chunk, per pair, between
tensors that live for a pair or a block: the resident memory then ran hundreds of MB above the live tensors
(bench/results/calibration_memory: the same conversion with and without this). A process-wide setting, so only
`fpewiden convert --calibration` makes it (at the command's entry); a program that calls the library decides for
itself.
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
