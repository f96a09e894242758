"""The process's heap policy: memory that a stage frees goes back to the system.

Why: glibc raises its mmap threshold to the size of each mmapped block it frees (up to 32 MiB),
so after the first CPU forward pass a model's activations of up to 32 MiB come from the heap,
which keeps what it frees. A stage then grows by a few hundred MiB over its first batches and
stays there, and the more batches a slide has the more of that it reaches: predict's peak RSS
grew from 1x to 2x tissue in benchmarks/camelyon_scale.py (2 batches at 1x, 3 and more beyond),
extract-features' likewise. A fixed threshold keeps every block >= 1 MiB in its own mapping,
returned when freed (docs/benchmarks.md). It changes no computed value, but every large block is
then faulted in afresh: pipeline/cli.py applies it to the inference stages only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.cache
def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold for this process (True if set; a no-op returning False with
    another allocator: macOS, musl). Forked children inherit it."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
