"""GGUF transformer files (city96's layout: BFL's tensor names, `general.architecture` "flux"), read one unit at a
time like a safetensors checkpoint (`CheckpointUnits`): quantised weights are handed out as the file's mapped
bytes for GGUFLinear, float ones dequantised to float32."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..flux.config import FluxConfig
from ..quantize.gguf import GGMLType, byte_shape, dequantize, read_gguf
from .checkpoint import CheckpointError, check_fits, file_backed
from .layout import TRANSFORMER_PREFIXES, transformer_config_from_shapes, unit_of

FLOAT_TYPES = {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}


def _flux_tensors(path: Path) -> dict[str, tuple[int, tuple[int, ...], Tensor]]:
    file = read_gguf(path)
    if file.architecture != "flux":
        raise CheckpointError(f"{path} is a GGUF file of architecture {file.architecture!r}, not a FLUX.1 transformer")
    tensors = file.tensors
    prefix = next((p for p in TRANSFORMER_PREFIXES if tensors and all(k.startswith(p) for k in tensors)), "")
    return {k[len(prefix):]: v for k, v in tensors.items()}


def gguf_config(path: str | os.PathLike, axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """The FluxConfig read off a GGUF transformer's tensor shapes."""
    shapes = {k: shape for k, (_, shape, _) in _flux_tensors(Path(path)).items()}
    return transformer_config_from_shapes(shapes, axes_dim)


class GGUFUnits:
    """A GGUF transformer's tensors by our names, one unit (a block, an embedder) at a time.

    `quantized` maps each weight stored in a quantised type to that type: load_transformer gives the blocks'
    linears among them a GGUFLinear, which keeps the bytes and dequantises per product. Every other tensor is
    dequantised to float32 when read (the loader casts it on).
    """

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.tensors = _flux_tensors(path)
        self.parts = dict.fromkeys(self.tensors)  # the keys, as CheckpointUnits names them
        self.quantized = {k: qtype for k, (qtype, _, _) in self.tensors.items() if qtype not in FLOAT_TYPES}
        self.float8: set[str] = set()  # no float8 in GGUF; load_transformer asks
        self.compact: set[str] = set()  # the quantised weights load_transformer gave a GGUFLinear
        self.units: dict[str, list[str]] = {}
        for key in self.tensors:
            self.units.setdefault(unit_of(key), []).append(key)
        self._droppable: bool | None = None

    def dtype(self, key: str) -> torch.dtype:
        return FLOAT_TYPES.get(self.tensors[key][0], torch.uint8)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][1]

    def check(self, model: nn.Module) -> None:
        """Refuse tensors whose names or shapes do not fit `model`; a GGUFLinear's weight is compared by its
        bytes (what it holds), everything else by its shape."""
        shapes = {}
        for key, (qtype, shape, _) in self.tensors.items():
            if key in self.compact:
                try:
                    shapes[key] = byte_shape(shape, qtype)
                except ValueError as e:
                    raise CheckpointError(f"{self.what}: {key}: {e}") from None
            else:
                shapes[key] = shape
        check_fits(model, shapes, self.what)

    def read(self, unit: str, mapped: bool = False) -> dict[str, Tensor]:
        """The tensors of one unit, named relative to it; quantised block weights as the file's bytes (mapped,
        or copied into fresh memory without `mapped`, so a streamed block really frees them)."""
        strip = len(unit) + 1
        out = {}
        for key in self.units.get(unit, []):
            qtype, shape, raw = self.tensors[key]
            if key in self.compact:
                out[key[strip:]] = raw if mapped else raw.clone()
                continue
            try:
                out[key[strip:]] = dequantize(raw, qtype, shape).clone()
            except ValueError as e:  # a type we cannot dequantise, named
                raise CheckpointError(f"{self.what}: {key}: {e}") from None
        return out

    def mapped_tensors(self, unit: str) -> list[Tensor]:
        """The mapped bytes `read(unit, mapped=True)` hands out, if they really are file mappings."""
        raws = [self.tensors[k][2] for k in self.units.get(unit, []) if k in self.compact]
        if self._droppable is None:
            self._droppable = file_backed(t for _, _, t in self.tensors.values())
        return raws if self._droppable else []
