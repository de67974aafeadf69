"""glibc's malloc, set from inside the process at start: large blocks stay on the heap (Linux/glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps it on
free, so a CPU training step that allocates and frees hundred-megabyte activations every micro-step spends
much of its time in page faults on memory it just gave back. M_MMAP_MAX = 0 keeps such blocks on the heap
and a high M_TRIM_THRESHOLD keeps freed heap for the next micro-step: the same as
GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=..., but `python train.py` and torchrun
runs get it without an environment variable. GPU memory is not affected.
"""

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def keep_large_allocations_on_heap():
    """Apply the setting; True where it took (Linux with glibc), False elsewhere (nothing changes)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
