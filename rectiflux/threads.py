"""How many CPU threads a model call gets: one, when the call is tiny and OpenMP's threads sleep when idle."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Multiply-adds of one linear or 3x3 convolution over the whole input (tokens x width^2, pixels x channels^2 x 9)
# below which one thread is faster than two when they sleep between parallel regions (docs/bench-threads.md).
SMALL_WORK = 1 << 24


@contextmanager
def threads_for(work: int, device: torch.device) -> Iterator[None]:
    """Run a model call on one CPU thread when its `work` is under SMALL_WORK and OpenMP threads sleep when idle.

    With OMP_WAIT_POLICY=PASSIVE (what a machine shared with other work needs) every parallel region wakes its
    threads from sleep, about 0.1 ms, which on the embedded shapes model is most of the work
    (`python -m benchmarks.threads`, docs/bench-threads.md): its transformer (hidden 128) takes 14.8 ms per step
    on 2 threads and 6.8 ms on one at 36 tokens, 29.6 against 17.9 ms at 276, and 67 against 80 ms the other way
    at 1044 tokens (17.1 M multiply-adds per linear); its VAE decodes a 64x64 image in 22 ms on 2 threads and
    10.5 ms on one. With spinning threads (the default policy) two threads win at every size, so nothing changes
    there.
    """
    threads = torch.get_num_threads()
    if (os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" or threads == 1 or device.type != "cpu"
            or work >= SMALL_WORK):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
