"""Hand memory the process has freed back to the operating system (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from typing import Any


def release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: the walk allocates and frees thousands of parameter-sized blocks; below glibc's mmap threshold (up to
    32 MB) freed blocks stay in the heap, so after a merge the process can keep most of a model's worth of memory
    it no longer uses, which a following ``apply_merged_delta`` or evaluation in the same process then stacks on.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def available_memory_bytes() -> int | None:
    """Bytes of RAM the process could still use without swapping (Linux ``MemAvailable``; elsewhere free pages),
    ``None`` when neither can be read."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None
