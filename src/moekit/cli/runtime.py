"""Process-level runtime settings applied by the CLI (never at import time)."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc malloc to serve large blocks from the heap and keep freed memory for reuse.

    By default every allocation above ~32 MB is a fresh mmap and is unmapped on free, so each
    large activation of every step pays first-touch page faults (~1 ms per MB on these VMs). PyTorch's
    CPU allocator does not cache, so training and benchmarks re-pay that cost on every call.
    Returns False (and changes nothing) where glibc is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False
