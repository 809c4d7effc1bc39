"""Big output arrays, filled once front to back, allocated on the kernel's base pages.

NumPy asks the kernel to back every array of 4 MiB or more with transparent huge pages (madvise
MADV_HUGEPAGE). Where the kernel's THP `defrag` setting is `madvise` (a common distribution default, and these
machines'), a page fault in such a region that finds no free huge page compacts memory on the spot instead of
falling back to base pages (numpy/numpy#31590). A decoded batch arrives in pieces and is written once, so it
faults page by page while the stream runs: measured here (docs/measurements.md), a streamed decode of 1,000,000
latents spent 9.5 s of kernel time filling its 4 GB float32 output allocated by NumPy, and 2.6 s on base pages.

An anonymous private mapping carries no such advice, so its pages come at the base-page cost whatever the state
of memory (and as huge pages where THP is `always`, without a compaction stall); it is released when the last
array viewing it goes. Only from 32 MiB on: below that, glibc's malloc recycles freed blocks (its mmap threshold
rises to the size of a block freed, up to 32 MiB on 64-bit), so an array allocated again and again, such as a
server's answer to each stream message, reuses pages already faulted in; a mapping of its own would fault every
time (measured: 4 MiB answers decoded 1-8 % slower so).
"""

from __future__ import annotations

import math
import mmap
import sys

import numpy as np
import numpy.typing as npt

MAPPED_FROM_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit: every bigger block is mapped afresh
_MAPPABLE = sys.platform.startswith("linux") and hasattr(mmap, "MAP_ANONYMOUS")


def empty(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """An uninitialized C-contiguous array, like np.empty; from 32 MiB on Linux, on an anonymous mapping of its
    own (no huge-page advice: see the module's docstring). Writable, and an ordinary ndarray to its users."""
    kind = np.dtype(dtype)
    nbytes = math.prod(shape) * kind.itemsize
    if not _MAPPABLE or nbytes < MAPPED_FROM_BYTES:
        return np.empty(shape, kind)
    try:
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:  # the same error np.empty raises, so that callers see one kind
        raise MemoryError(f"unable to allocate {nbytes / 2**30:.2f} GiB for an array with shape {tuple(shape)} "
                          f"and data type {kind}: {exc.strerror}") from None
    return np.frombuffer(pages, kind).reshape(shape)
