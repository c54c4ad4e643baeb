"""How the CPU heap treats activations: freed ones are reused instead of fresh pages (glibc).

glibc serves every allocation above its mmap threshold (at most 32 MiB once it has adapted) with a fresh mapping,
unmaps it on free, and trims the top of the heap whenever it exceeds its trim threshold. Each transformer block
then writes its activations into zero-filled pages again (`python -m benchmarks.heap` counts the page faults).
From the first generation on the CPU (`keep_freed_memory`, which the pipeline calls; model code never does) both
thresholds are raised, so freed activations stay in the heap for the next block and step; the pipeline hands the
heap's free memory back to the system at the end of every generation (`release`), so a process holds no more
between images than it did before. A streamed model pins the threshold low instead, for the whole process.

torch asks for 64-byte-aligned blocks, and glibc can leave a few freed large blocks unmerged behind the small
remainders of such requests until the next trim; peak memory measured the same either way (docs/bench-heap.md).
RECTIFLUX_KEEP_FREED_MEMORY=0 in the environment leaves glibc's thresholds alone (for an application that tunes its
own allocator).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STREAMING_MMAP_THRESHOLD, STREAMING_TRIM_THRESHOLD = 1 << 20, 64 << 20
_KEEP = 2**31 - 1  # mallopt takes an int: larger than any one activation, so "never"

F = TypeVar("F", bound=Callable)

_lock = threading.Lock()
_mode: str | None = None  # None (glibc's own dynamic thresholds), "keep" or "stream"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - other C libraries lack them
    except (OSError, AttributeError):
        return None
    return libc


def _set(mode: str, mmap_threshold: int, trim_threshold: int) -> None:
    global _mode
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    _mode = mode


def keep_freed_memory(device: torch.device | str) -> None:
    """Before a generation on `device`: on the CPU, from now on keep freed memory in the heap for reuse.

    Process-wide (glibc has one heap) and idempotent; nothing happens off the CPU, without glibc, once a streamed
    model pinned the threshold low, or with RECTIFLUX_KEEP_FREED_MEMORY=0.
    """
    if (_mode is None and torch.device(device).type == "cpu" and _glibc() is not None
            and os.environ.get("RECTIFLUX_KEEP_FREED_MEMORY", "1") != "0"):
        with _lock:
            if _mode is None:
                _set("keep", _KEEP, _KEEP)


def release() -> None:
    """Hand the heap's free memory back to the system (the end of a generation)."""
    if _mode == "keep":
        _glibc().malloc_trim(0)


def released_after(fn: F) -> F:
    """Decorate a whole generation: `release` once it returned or raised."""
    @functools.wraps(fn)
    def generation(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            release()
    return generation  # type: ignore[return-value]


@contextlib.contextmanager
def weights_in_their_own_mappings() -> Iterator[None]:
    """While reading weights that outlive the call, into a heap that keeps freed memory: each large tensor is its
    own mapping, as with glibc's thresholds.

    Otherwise a lazily read block's weights grow the heap, and the float copy of a quantised block, freed once it
    is quantised, is split by the quantised weights placed after it: later blocks and activations take fresh
    memory. glibc still serves a request from free memory already in the heap first, so how much this saves
    depends on the heap's history (the int8 rows of `python -m benchmarks.bench` show the peak).
    """
    with _lock:
        keeping = _mode == "keep"
        if keeping:
            _glibc().mallopt(_M_MMAP_THRESHOLD, STREAMING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if keeping:
            with _lock:
                if _mode == "keep":
                    _glibc().mallopt(_M_MMAP_THRESHOLD, _KEEP)


def return_freed_memory_to_the_system() -> None:
    """Make glibc give every freed block of 1 MiB or more straight back to the system, for the rest of the process.

    For streamed transformer blocks: with glibc's dynamic threshold freed block weights stayed in the heap, which
    it does not shrink, and the resident memory of a streamed model grew to several blocks (docs/bench-dev8bit.md,
    `python -m benchmarks.dev8bit`).
    """
    with _lock:
        was_keeping = _mode == "keep"
        _set("stream", STREAMING_MMAP_THRESHOLD, STREAMING_TRIM_THRESHOLD)
    if was_keeping:
        _glibc().malloc_trim(0)
