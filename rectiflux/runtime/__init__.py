"""The CPU runtime policy: glibc's heap kept for reuse during a generation (`heap`) and tiny calls on one thread
(`threads`). Opt-in and process-wide, so only the pipeline, the CLI and the server start it, never model code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import heap
from .threads import threads_for

__all__ = ["generation", "threads_for"]


@contextmanager
def generation(device: torch.device | str) -> Iterator[None]:
    """Around one generation on `device`: freed activations reused from the heap, handed back at the end."""
    heap.keep_freed_memory(device)
    try:
        yield
    finally:
        heap.release()
