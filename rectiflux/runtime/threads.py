"""How many CPU threads a model call gets: one, when the call is tiny and OpenMP's threads sleep when idle."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Multiply-adds of one linear or 3x3 convolution over the whole input (tokens x width^2, pixels x channels^2 x 9)
# below which one thread is faster than two when they sleep between parallel regions (docs/bench-threads.md).
SMALL_WORK = 1 << 24

_lock = threading.Lock()
_single = 0  # calls now running on one thread
_threads = 0  # the thread count to restore once the last of them ends


@contextmanager
def threads_for(work: int, device: torch.device | str) -> Iterator[None]:
    """Run a model call on one CPU thread when its `work` is under SMALL_WORK and OpenMP threads sleep when idle.

    With OMP_WAIT_POLICY=PASSIVE (what a machine shared with other work needs) every parallel region wakes its
    threads from sleep, which on the embedded shapes model costs more than the arithmetic
    (`python -m benchmarks.threads`, docs/bench-threads.md). With spinning threads (the default policy) two threads
    win at every size, so nothing changes there. Thread-safe: concurrent calls (a server's requests) share one
    count, and the thread count the process had is restored when the last small call ends.
    """
    global _single, _threads
    if (os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" or torch.device(device).type != "cpu"
            or work >= SMALL_WORK):
        yield
        return
    with _lock:
        if _single == 0:
            _threads = torch.get_num_threads()
        _single += 1
        if _threads > 1:
            torch.set_num_threads(1)
    try:
        yield
    finally:
        with _lock:
            _single -= 1
            if _single == 0 and _threads > 1:
                torch.set_num_threads(_threads)
