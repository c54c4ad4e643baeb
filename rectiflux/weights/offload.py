"""Transformer blocks read from disk when they are needed: at first use ("lazy") or before every use ("stream")."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..runtime.heap import return_freed_memory_to_the_system, weights_in_their_own_mappings
from .checkpoint import CAN_DROP_MAPPED_PAGES, advise_mapped, load_into

if TYPE_CHECKING:
    from .transformer import CheckpointUnits


class BlockWeights:
    """Reads a transformer's blocks from disk when they are first needed ("lazy") or each time ("stream").

    "lazy" loads in the time it takes to read the headers and then holds each block from its first use on,
    as a memory-mapped file would; "stream" frees each block after it ran, so peak memory is about two blocks
    plus the activations and the small float parts, for machines that cannot hold the model. While a streamed
    block, or a lazy one on a GPU, runs, the next one is read by a background thread (file reads release the GIL).
    With `mapped`, blocks on the CPU use the tensors they keep as stored straight from the memory-mapped file; a
    streamed block then gives its pages back to the page cache after it ran (`advise_mapped`) and the background
    thread maps the next block's pages in advance, which costs page-table work instead of a copy of every weight.
    `prepare(block, dtype)` runs on each block right after it was read (casting to `dtype`, the model's dtype,
    which `Flux.to` keeps up to date; quantisation; attention dtype). With `rewrites`, prepare replaces the
    mapped tensors (a GGUF file's blocks quantised again), whose pages are then given back at once: they would
    stay resident beside the result.
    """

    def __init__(self, units: CheckpointUnits, mode: str, order: list[str],
                 prepare: Callable[[nn.Module, torch.dtype | None], None] | None = None, mapped: bool = False,
                 dtype: torch.dtype | None = None, rewrites: bool = False):
        if mode not in ("lazy", "stream"):
            raise ValueError(f"unknown blocks mode {mode!r}; use 'memory', 'lazy' or 'stream'")
        # a streamed block may only use the mapped file where its pages can be given back after it ran
        mapped = mapped and (mode == "lazy" or CAN_DROP_MAPPED_PAGES)
        self.units, self.mode, self.prepare, self.mapped, self.dtype = units, mode, prepare, mapped, dtype
        self.rewrites = rewrites
        self.on_read: list[Callable[[str, nn.Module], None]] = []  # told of each block once it is read (LoRA)
        self.next = dict(zip(order, [*order[1:], order[0]], strict=True)) if order else {}
        self.loaded: set[str] = set()
        self.pending: tuple[str, Future] | None = None
        self.reader = None
        if mode == "stream":
            self.reader = ThreadPoolExecutor(1, thread_name_prefix="rectiflux-blocks")
            return_freed_memory_to_the_system()

    def _read(self, name: str, mapped: bool) -> dict[str, Tensor]:
        if self.pending is not None and self.pending[0] == name:
            state, self.pending = self.pending[1].result(), None
            return state
        return self.units.read(name, mapped=mapped)

    def before(self, name: str, block: nn.Module, device: torch.device) -> None:
        if name in self.loaded or name not in self.next:  # in memory already, or not one of ours
            return
        # A lazy model on the CPU that keeps its tensors as stored maps them: cheaper than copying into fresh
        # memory. A streamed one must really free each block, so it copies; so does one on a GPU, where the block
        # is copied to the device anyway and the mapped pages would stay resident beside the copy (peak RSS in
        # docs/bench-gpu.md), and where reading the next block while this one runs hides the reads.
        on_cpu = torch.device(device).type == "cpu"
        mapped = self.mapped and on_cpu
        with weights_in_their_own_mappings():
            state = {k: v.to(device) for k, v in self._read(name, mapped).items()}
            if not on_cpu and self.reader is None:
                self.reader = ThreadPoolExecutor(1, thread_name_prefix="rectiflux-blocks")
            upcoming = self.next[name]
            if self.reader is not None and self.pending is None and upcoming not in self.loaded:
                self.pending = (upcoming, self.reader.submit(self._read_ahead, upcoming, mapped))
            load_into(block, state, None, f"{self.units.what} ({name})")
            if self.prepare is not None:
                self.prepare(block, self.dtype)
                if mapped and self.rewrites:
                    advise_mapped(self.units.mapped_tensors(name), "drop")
            for told in self.on_read:
                told(name, block)
        self.loaded.add(name)

    def _read_ahead(self, name: str, mapped: bool) -> dict[str, Tensor]:
        state = self.units.read(name, mapped=mapped)
        if mapped:
            advise_mapped(self.units.mapped_tensors(name), "populate")
        return state

    def on_disk(self, name: str) -> bool:
        """Whether unit `name` is one of ours that is not in memory now (its module is on the meta device)."""
        return name in self.next and name not in self.loaded

    def read_all(self, model: nn.Module) -> None:
        """Read every unit still on disk into `model`, for a model that stops reading on demand."""
        if self.mode == "stream":
            raise ValueError("a streamed transformer keeps its blocks on disk; load it with blocks='memory'")
        for unit in self.next:
            self.before(unit, model.get_submodule(unit), model.device)

    def after(self, name: str, block: nn.Module) -> None:
        if self.mode == "stream" and name in self.next:
            block.to_empty(device="meta")  # drops the weights; the next call reads them again
            if self.mapped:  # harmless if the block ran elsewhere: its mapped pages were then never touched
                advise_mapped(self.units.mapped_tensors(name), "drop")
            self.loaded.discard(name)


class DeviceOffload:
    """Blocks kept in CPU memory and moved to `device` only while they run (sequential CPU offload)."""

    def __init__(self, device: torch.device, blocks: list[str]):
        self.device, self.blocks = torch.device(device), set(blocks)
        self.dtype: torch.dtype | None = None

    def before(self, name: str, block: nn.Module, device: torch.device) -> None:
        if name in self.blocks:
            block.to(self.device)

    def after(self, name: str, block: nn.Module) -> None:
        if name in self.blocks:
            block.to("cpu")

    def on_disk(self, name: str) -> bool:
        return name in self.blocks  # "elsewhere": moving the model leaves them in CPU memory

    def read_all(self, model: nn.Module) -> None:
        for name in self.blocks:
            model.get_submodule(name).to(model.device)
