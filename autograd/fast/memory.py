"""Host memory settings for the CPU kernels: glibc's malloc, and NumPy's buffer size.

Both change how the whole process behaves, so neither happens on import:
`keep_freed_host_memory` runs at the first chunk loop of a fast kernel
(threads.parallel_for), and `narrow_buffer` is set and restored around each
use.
"""
import ctypes
import os

import numpy as np


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_host_memory_kept = False


def keep_freed_host_memory():
    """Ask glibc's malloc to keep freed memory for the next arrays (once per process).

    A training step allocates and frees the same full-size arrays again and
    again. By default glibc serves anything above a moving threshold with a
    fresh mmap and hands the top of its heap back to the OS once more than
    twice that is free, so the next step's arrays land on fresh pages: a page
    fault and a zeroed page per 4 KB written, serialized between threads,
    which can take longer than the arithmetic of an element-wise kernel.
    What it costs: the process's resident memory stays near its peak instead
    of shrinking between steps (the peak itself hardly moves), and each
    thread's malloc arena may keep freed memory too. Arrays above 32 MB (glibc's ceiling for the threshold)
    still get their own mapping. The fast kernels ask for this at their
    first CPU loop; AUTOGRAD_MALLOC=default (or TINYDDPM_MALLOC) leaves glibc's
    defaults alone. Does nothing where the C library is not glibc; returns
    whether it applied. CuPy needs none of this: its memory pool already
    reuses device memory.
    """
    global _host_memory_kept
    if _host_memory_kept:
        return True
    if "default" in (os.environ.get("AUTOGRAD_MALLOC"), os.environ.get("TINYDDPM_MALLOC")):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError, AttributeError):   # not glibc, or no confstr on this platform
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    _host_memory_kept = bool(ok)
    return _host_memory_kept


# NumPy's buffer size (values) while a CPU kernel's chunk multiplies or adds
# full-size rows and a per-row value (the group norm's x * a + c with a, c of
# shape (n, C, 1)). Such a broadcast stops NumPy from treating the rows as one
# long run, so by default its iterator copies several rows at a time into
# buffers of 8192 values and the per-row operand out value by value. With a
# buffer shorter than a row it works on the rows in place, which pays for rows
# of a 14x14 map and up and costs on shorter ones, so rows shorter than
# _NARROW_FROM keep the default. The setting is NumPy's, per thread.
_NARROW_BUFFER = 16                     # NumPy wants a multiple of 16
_NARROW_FROM = 128


def narrow_buffer(row):
    """Set NumPy's buffer below a row of `row` values where that pays (see
    above); returns what to hand restore_buffer afterwards."""
    return np.setbufsize(_NARROW_BUFFER) if row >= _NARROW_FROM else None


def restore_buffer(old):
    if old is not None:
        np.setbufsize(old)


