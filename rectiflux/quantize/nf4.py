"""bitsandbytes' 4-bit weights (NF4 and FP4), as Forge's `flux1-dev-bnb-nf4` checkpoints store them, read without
bitsandbytes: `BnbLinear` keeps them 4-bit in memory and dequantises them for each product, as GGUFLinear does.

A weight `W` of shape (out, in) is stored as `W` (uint8, two codes a byte, the first in the high nibble, row-major),
`W.quant_map` (the 16 values the codes stand for), `W.absmax` (one scale per block of `blocksize` weights) and
`W.quant_state.bitsandbytes__nf4` (JSON bytes: quant_type, blocksize, dtype, shape). With nested statistics (Forge's
first NF4 file; its v2 keeps them float32) the scales are themselves 8-bit: `absmax` indexes `W.nested_quant_map`,
times `W.nested_absmax` per block of `nested_blocksize` scales, plus the JSON's `nested_offset`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..weights.checkpoint import CheckpointError
from .gguf import dequantized_product

STATE_MARK = ".quant_state.bitsandbytes__"
SIDE = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # a weight's tensors beside it, and their names


def quant_states(keys: Mapping[str, object]) -> dict[str, str]:
    """weight key -> the key of its quantisation state, for each bitsandbytes 4-bit weight among `keys`."""
    return {k.partition(STATE_MARK)[0]: k for k in keys if STATE_MARK in k}


def side_keys(weight_key: str, keys: Mapping[str, object]) -> dict[str, str]:
    """A 4-bit weight's side tensors present among `keys`: name (one of SIDE) -> key."""
    return {name: f"{weight_key}.{name}" for name in SIDE if f"{weight_key}.{name}" in keys}


def parse_state(raw: Tensor, what: str) -> dict:
    """The JSON of a `quant_state.bitsandbytes__*` tensor, checked for what BnbLinear reads."""
    try:
        state = json.loads(bytes(raw.reshape(-1).tolist()))
        shape = tuple(int(n) for n in state["shape"])
        blocksize = int(state["blocksize"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{what}: unreadable bitsandbytes quantisation state ({e})") from None
    if state.get("quant_type") not in ("nf4", "fp4") or len(shape) != 2 or blocksize <= 0:
        raise CheckpointError(f"{what}: a bitsandbytes state of type {state.get('quant_type')!r} and shape "
                              f"{list(shape)}; only 2-D NF4 and FP4 weights are read")
    return {"shape": shape, "blocksize": blocksize, "nested_blocksize": int(state.get("nested_blocksize", 256)),
            "nested_offset": float(state.get("nested_offset", 0.0))}


def packed_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """How bitsandbytes stores a 4-bit weight of `shape`: (ceil(n / 2), 1) bytes."""
    return ((math.prod(shape) + 1) // 2, 1)


def dequantize(weight: Tensor, absmax: Tensor, quant_map: Tensor, blocksize: int, shape: tuple[int, ...],
               nested_absmax: Tensor | None = None, nested_quant_map: Tensor | None = None,
               nested_blocksize: int = 256, nested_offset: float = 0.0, dtype: torch.dtype = torch.float32,
               first: int = 0) -> Tensor:
    """The float32 weights (cast to `dtype`) of `shape` that the packed bytes `weight` stand for, `weight` holding
    the elements from `first` on (a multiple of `blocksize`, where a chunk of rows starts) and `absmax` all the
    weight's scales."""
    n = math.prod(shape)
    # each byte's two values at once, looked up by 32-bit indices: faster than unpacking the codes to int64
    # indices first, with the same values
    byte = torch.arange(256, device=quant_map.device)
    pairs = torch.stack((quant_map.float()[byte >> 4], quant_map.float()[byte & 15]), -1)
    values = torch.index_select(pairs, 0, weight.reshape(-1).int()).reshape(-1)[:n]
    blocks = slice(first // blocksize, (first + n + blocksize - 1) // blocksize)
    scales = absmax[blocks]
    if nested_absmax is not None:  # 8-bit scales: a code of nested_quant_map times their own block's scale
        index = torch.arange(blocks.start, blocks.start + scales.numel(), device=scales.device) // nested_blocksize
        scales = nested_quant_map[scales.long()] * nested_absmax[index] + nested_offset
    whole = n - n % blocksize
    values[:whole].view(-1, blocksize).mul_(scales[: whole // blocksize, None].float())
    if whole < n:
        values[whole:].mul_(scales[-1].float())
    return values.reshape(shape).to(dtype)


class BnbLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight stays bitsandbytes 4-bit in memory, dequantised per product."""

    def __init__(self, in_features: int, out_features: int, blocksize: int, nested: bool, bias: bool = True,
                 nested_blocksize: int = 256, nested_offset: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.nested_blocksize, self.nested_offset = blocksize, nested_blocksize, nested_offset
        blocks = (in_features * out_features + blocksize - 1) // blocksize
        self.register_buffer("weight", torch.empty(packed_shape((out_features, in_features)), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("quant_map", torch.empty(16, device=device))
        if nested:
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.empty((blocks + nested_blocksize - 1) // nested_blocksize,
                                                              device=device))
            self.register_buffer("nested_quant_map", torch.empty(256, device=device))
        else:
            self.register_buffer("absmax", torch.empty(blocks, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("nested_quant_map", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _rows_aligned(self) -> bool:
        return self.in_features % (2 * self.blocksize) == 0  # a row starts on a byte and on a block

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> Tensor:
        start, stop, _ = rows.indices(self.out_features)
        if not self._rows_aligned() and (start, stop) != (0, self.out_features):
            return self.dequantized_weight(dtype)[rows]
        first = start * self.in_features
        packed = self.weight.reshape(-1)[first // 2:(stop * self.in_features + 1) // 2]
        return dequantize(packed, self.absmax, self.quant_map, self.blocksize, (stop - start, self.in_features),
                          self.nested_absmax, self.nested_quant_map, self.nested_blocksize, self.nested_offset,
                          dtype, first)

    def forward(self, x: Tensor) -> Tensor:
        return dequantized_product(self, x, chunked=self._rows_aligned())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, nested={self.nested_absmax is not None}")
