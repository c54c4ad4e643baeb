"""GGUF weights (llama.cpp's format): pure-torch dequantisers, `GGUFLinear`, and reading and writing the files.

A GGML tensor is stored row by row, each row a run of blocks along its innermost dimension (torch's last): a
block packs `block_size` elements into `type_size` bytes, little-endian float16 scales beside packed integer
codes (the layouts of ggml-common.h, recalled type by type below). Each dequantiser works on all blocks at once
and computes in float32 in the order `gguf.quants.dequantize` (numpy) does, so the two give the same bits: the
float16 scales are widened to float32 first, then multiplied, then offset.

Only `read_gguf`, `write_gguf` and `quantize_to_raw` need the `gguf` package (imported when called); the
dequantisers and `GGUFLinear` are torch alone.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files import atomic_write
from ..weights.checkpoint import CheckpointError

QK_K = 256  # elements in a K-quant super-block


class GGMLType(IntEnum):
    """ggml's tensor types (`GGMLQuantizationType` in gguf-py), so refusals can name the ones we lack."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements, bytes) per block of each type we dequantise
BLOCKS: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
}
# what gguf-py's numpy quantiser can write (it has no K-quant quantiser)
QUANTIZABLE = (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1,
               GGMLType.Q5_0, GGMLType.Q5_1)


# byte offsets of the float16 scales (d, and dmin or m) in each block: random bytes there could be NaN or infinity,
# so whoever writes random blocks (tests, benchmarks) sets these
F16_FIELDS = {GGMLType.Q8_0: [0], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2], GGMLType.Q4_0: [0],
              GGMLType.Q4_1: [0, 2], GGMLType.Q6_K: [208], GGMLType.Q5_K: [0, 2], GGMLType.Q4_K: [0, 2],
              GGMLType.Q3_K: [108], GGMLType.Q2_K: [80, 82]}


def type_name(qtype: int) -> str:
    try:
        return GGMLType(qtype).name
    except ValueError:
        return f"#{int(qtype)}"


def _names(types: Sequence[GGMLType]) -> str:
    return ", ".join(t.name for t in types)


def supported_type(qtype: int) -> GGMLType:
    """`qtype` as a GGMLType we can dequantise, else ValueError naming it."""
    if qtype not in BLOCKS:
        raise ValueError(f"GGUF tensor type {type_name(qtype)} is not supported; supported: {_names(list(BLOCKS))}")
    return GGMLType(qtype)


def byte_shape(shape: Sequence[int], qtype: int) -> tuple[int, ...]:
    """The (rows..., bytes per row) shape of the raw data behind a tensor of torch shape `shape`."""
    qtype = supported_type(qtype)
    block_size, type_size = BLOCKS[qtype]
    shape = tuple(int(n) for n in shape) or (1,)  # a 0-d tensor is one element
    if shape[-1] % block_size:
        raise ValueError(f"a {qtype.name} tensor's last dimension must be a multiple of {block_size}; got shape "
                         f"{shape}")
    return (*shape[:-1], shape[-1] // block_size * type_size)


def check_size(raw: Tensor, qtype: int, shape: Sequence[int]) -> None:
    """Refuse (ValueError) raw data that is not uint8 or whose size does not fit `shape` in `qtype`."""
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw GGUF data must be uint8 bytes, got {raw.dtype}")
    expected = math.prod(byte_shape(shape, qtype))
    if raw.numel() != expected:
        raise ValueError(f"a {type_name(qtype)} tensor of shape {tuple(shape)} takes {expected} bytes, "
                         f"got {raw.numel()}")


# --- dequantisers: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ------------------------------


def _float(b: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, k * size) bytes of little-endian `dtype` fields -> (n, k) float32 (widening is exact)."""
    return b.contiguous().view(dtype).float()


def _f16(b: Tensor) -> Tensor:
    return _float(b, torch.float16)


# The dequantisers scale their freshly widened codes in place: a new tensor per broadcast operation costs more than
# the arithmetic (same operations in the same order, so the bits stay numpy's).


def _fields(b: Tensor, width: int) -> Tensor:
    """(..., k) bytes -> (..., 8 // width, k): field i is bits [i * width, (i + 1) * width) of every byte.

    ggml packs sub-byte codes this way: byte j's low field is element j, its next field element j + k, and so on.
    """
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device)[:, None]
    return (b.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _q8_0(b: Tensor) -> Tensor:
    # d: f16 | qs: 32 x int8; x = q * d
    d, qs = b.split([2, 32], 1)
    # widened straight from the strided bytes: a contiguous copy of them first costs twice the whole product
    return qs.view(torch.int8).float().mul_(_f16(d))


def _low5(qs: Tensor, qh: Tensor) -> Tensor:
    """Q5_0/Q5_1 codes: qs holds the low nibbles (element j low, j + 16 high), qh bit j (little-endian uint32)
    the fifth bit of element j."""
    n = qs.shape[0]
    high = _fields(qh, 1).transpose(1, 2).reshape(n, 32)  # byte i's bit k is bit 8i + k of the uint32
    return (_fields(qs, 4).reshape(n, 32) | (high << 4)).float()


def _q5_0(b: Tensor) -> Tensor:
    # d: f16 | qh: 4 bytes | qs: 16 bytes; x = d * (q - 16)
    d, qh, qs = b.split([2, 4, 16], 1)
    return _low5(qs, qh).sub_(16).mul_(_f16(d))


def _q5_1(b: Tensor) -> Tensor:
    # d: f16 | m: f16 | qh: 4 bytes | qs: 16 bytes; x = d * q + m
    d, m, qh, qs = b.split([2, 2, 4, 16], 1)
    return _low5(qs, qh).mul_(_f16(d)).add_(_f16(m))


def _q4_0(b: Tensor) -> Tensor:
    # d: f16 | qs: 16 bytes, element j in the low nibble of byte j, j + 16 in its high nibble; x = d * (q - 8)
    d, qs = b.split([2, 16], 1)
    return _fields(qs, 4).reshape(-1, 32).float().sub_(8).mul_(_f16(d))


def _q4_1(b: Tensor) -> Tensor:
    # d: f16 | m: f16 | qs: 16 bytes as Q4_0; x = d * q + m
    d, m, qs = b.split([2, 2, 16], 1)
    return _fields(qs, 4).reshape(-1, 32).float().mul_(_f16(d)).add_(_f16(m))


def _q6_k(b: Tensor) -> Tensor:
    # ql: 128 bytes (low nibbles) | qh: 64 bytes (2 high bits each) | scales: 16 x int8 | d: f16.
    # 16 sub-blocks of 16; x = (d * scale) * (q - 32). Each half of 128 elements has 64 ql bytes (element j and
    # j + 64 in byte j's nibbles) and 32 qh bytes (elements j, j + 32, j + 64, j + 96 in byte j's bit pairs).
    ql, qh, scales, d = b.split([128, 64, 16, 2], 1)
    n = b.shape[0]
    low = _fields(ql.reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _fields(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = (low | (high << 4)).float().sub_(32).reshape(n, 16, 16)
    scale = _f16(d) * scales.contiguous().view(torch.int8).float()
    return q.mul_(scale.unsqueeze(-1)).reshape(n, QK_K)


def _k_scale_min(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (as float32), packed as:
    bytes 0-3: scale 0-3 in bits 0-5, bits 6-7 the top of scale 4-7; bytes 4-7: the same for the mins;
    bytes 8-11: the low nibble of scale 4-7 and, in the high nibble, the low bits of min 4-7."""
    s, m, low = scales.reshape(-1, 3, 4).unbind(1)
    scale = torch.cat([s & 63, (low & 15) | ((s >> 2) & 0x30)], 1)
    mins = torch.cat([m & 63, (low >> 4) | ((m >> 2) & 0x30)], 1)
    return scale.float(), mins.float()


def _q4_5_k(d: Tensor, dmin: Tensor, scales: Tensor, q: Tensor) -> Tensor:
    """8 sub-blocks of 32: x = (d * scale) * q - dmin * min, into the fresh float codes `q`."""
    scale, mins = _k_scale_min(scales)
    return q.mul_((_f16(d) * scale).unsqueeze(-1)).sub_((_f16(dmin) * mins).unsqueeze(-1)).reshape(-1, QK_K)


def _k_nibbles(qs: Tensor) -> Tensor:
    """128 bytes -> (n, 8, 32): four runs of 32 bytes, each the low nibbles of one sub-block, then the high."""
    return _fields(qs.reshape(-1, 4, 32), 4).reshape(-1, 8, 32)


def _q5_k(b: Tensor) -> Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes (bit i of byte j: element j of sub-block i) | qs: 128
    d, dmin, scales, qh, qs = b.split([2, 2, 12, 32, 128], 1)
    return _q4_5_k(d, dmin, scales, (_k_nibbles(qs) | (_fields(qh, 1) << 4)).float())


def _q4_k(b: Tensor) -> Tensor:
    # d: f16 | dmin: f16 | scales: 12 bytes | qs: 128 bytes
    d, dmin, scales, qs = b.split([2, 2, 12, 128], 1)
    return _q4_5_k(d, dmin, scales, _k_nibbles(qs).float())


def _k_crumbs(qs: Tensor) -> Tensor:
    """Q2_K/Q3_K's 64 bytes of 2-bit codes -> (n, 16, 16): each half of 128 elements is 32 bytes, elements j,
    j + 32, j + 64, j + 96 in byte j's bit pairs from the lowest."""
    return _fields(qs.reshape(-1, 2, 32), 2).reshape(-1, 16, 16)


def _q3_k(b: Tensor) -> Tensor:
    # hmask: 32 bytes | qs: 64 bytes (low 2 bits) | scales: 12 bytes | d: f16. 16 sub-blocks of 16;
    # x = (d * (scale - 32)) * (q - 4 if the hmask bit is clear else q): bit i of hmask byte j is the third
    # bit of element 32i + j. The 6-bit scales: bytes 0-7 hold the low nibbles (scale j in byte j's low nibble,
    # j + 8 in its high one), bytes 8-11 the top bit pairs (scale 4i + j in byte 8 + j's pair i).
    hmask, qs, scales, d = b.split([32, 64, 12, 2], 1)
    n = b.shape[0]
    low = _fields(scales[:, :8], 4).reshape(n, 16)
    high = _fields(scales[:, 8:], 2).reshape(n, 16)
    scale = _f16(d) * ((low | (high << 4)).float() - 32)
    q = _k_crumbs(qs).float() - 4 * (1 - _fields(hmask, 1).reshape(n, 16, 16)).float()
    return q.mul_(scale.unsqueeze(-1)).reshape(n, QK_K)


def _q2_k(b: Tensor) -> Tensor:
    # scales: 16 bytes (low nibble: scale, high nibble: min, per sub-block of 16) | qs: 64 bytes | d | dmin: f16;
    # x = (d * scale) * q - dmin * min
    scales, qs, d, dmin = b.split([16, 64, 2, 2], 1)
    scale = (_f16(d) * (scales & 15).float()).unsqueeze(-1)
    mins = (_f16(dmin) * (scales >> 4).float()).unsqueeze(-1)
    return _k_crumbs(qs).float().mul_(scale).sub_(mins).reshape(-1, QK_K)


DEQUANTIZERS: dict[GGMLType, Callable[[Tensor], Tensor]] = {
    GGMLType.F32: lambda b: _float(b, torch.float32),
    GGMLType.F16: lambda b: _float(b, torch.float16),
    GGMLType.BF16: lambda b: _float(b, torch.bfloat16),
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q6_K: _q6_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q3_K: _q3_k,
    GGMLType.Q2_K: _q2_k,
}


def dequantize(raw: Tensor, qtype: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The `shape` tensor (torch order, outermost first) that the bytes `raw` (uint8, any shape) stand for.

    Computed in float32 on raw's device, then cast to `dtype`. An F32 tensor read as float32 shares raw's memory.
    """
    qtype = supported_type(qtype)
    check_size(raw, qtype, shape)
    blocks = raw.reshape(-1, BLOCKS[qtype][1])
    return DEQUANTIZERS[qtype](blocks).reshape(tuple(shape)).to(dtype)


CHUNK_ELEMENTS = 1 << 22  # weights dequantised per product: 16 MB of float32
COMPILED_CHUNK_ELEMENTS = 1 << 24  # the same in a compiled block


def dequantized_product(linear: nn.Module, x: Tensor, chunked: bool = True) -> Tensor:
    """x @ weight.T + bias for a linear whose weight stays compact in memory (GGUFLinear, nf4.BnbLinear): the
    weight is dequantised to x's dtype for this product only, `linear.dequantized_weight(dtype, rows)` a few
    thousand output rows at a time (unless not `chunked`).

    A whole FLUX weight in float32 (up to 264 MB) and the dequantiser's temporaries, at every size the blocks have,
    would leave the heap fragmented several GB above the file's size; chunks of one size are reused from one product
    to the next. Compiled, the dequantiser fuses into one pass and the graph grows with every chunk (so does its
    compile time), in memory a few chunks live at once: larger chunks are the middle (figures: docs/benchmarks.md).
    """
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    chunk = COMPILED_CHUNK_ELEMENTS if torch.compiler.is_compiling() else CHUNK_ELEMENTS
    rows = max(1, chunk // linear.in_features)
    if linear.out_features <= rows or not chunked:
        return F.linear(x, linear.dequantized_weight(x.dtype), bias)
    return torch.cat([F.linear(x, linear.dequantized_weight(x.dtype, slice(start, start + rows)),
                               None if bias is None else bias[start:start + rows])
                      for start in range(0, linear.out_features, rows)], dim=-1)


class GGUFLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight stays GGML-quantised in memory.

    `weight` is a uint8 buffer of the raw blocks, (out_features, bytes per row); each forward dequantises it to
    the input's dtype for that call only. `bias`, if any, is a float parameter that does not require grad.
    """

    def __init__(self, in_features: int, out_features: int, qtype: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.qtype = supported_type(qtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(byte_shape((out_features, in_features), self.qtype),
                                                   dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_raw(cls, raw: Tensor, qtype: int, shape: Sequence[int], bias: Tensor | None = None) -> GGUFLinear:
        """A module over `raw` (not copied) holding a weight of torch shape `shape` = (out_features, in_features)."""
        if len(shape) != 2:
            raise ValueError(f"a linear weight has 2 dimensions, got shape {tuple(shape)}")
        out_features, in_features = (int(n) for n in shape)
        check_size(raw, qtype, shape)
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {out_features} output features")
        module = cls(in_features, out_features, qtype, bias=False, device="meta")
        module.weight = raw.reshape(byte_shape(shape, qtype))
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> Tensor:
        raw = self.weight[rows]
        return dequantize(raw, self.qtype, (raw.shape[0], self.in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        return dequantized_product(self, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={self.qtype.name}")


# --- files ----------------------------------------------------------------------------------------------------


@dataclass
class GGUFFile:
    """A memory-mapped GGUF file: `tensors` maps each name to (qtype, torch shape, raw uint8 bytes).

    The raw tensors share the mapping (copy-on-write: writing to one never reaches the file), so no weight is
    read before it is used. Supported types come as (rows..., bytes per row), others as flat bytes.
    """

    path: Path
    architecture: str | None
    tensors: dict[str, tuple[int, tuple[int, ...], Tensor]]


def _one_line(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())


@functools.cache
def _reader_class() -> type:
    import gguf

    class StrictReader(gguf.GGUFReader):
        """GGUFReader, failing at the first read past the end of the file.

        The stock reader gets short (or empty) arrays there and goes on, so a corrupt array length of 2**40 has it
        loop, and grow a list, ~forever; requiring every read to be whole bounds the parse by the file's size.
        """

        def _get(self, offset, dtype, count=1, *args, **kwargs):
            array = super()._get(offset, dtype, count, *args, **kwargs)
            if len(array) != int(count):
                raise ValueError(f"the file ends inside a field or tensor at byte {int(offset)}")
            return array

    return StrictReader


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped); CheckpointError with one line if it is missing, corrupt or truncated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no GGUF file at {path}")
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path} is a GGUF file, which needs the gguf package: pip install "
                              "'rectiflux[gguf]'") from None
    try:
        # numpy's overflow warnings on garbage sizes mean a corrupt file: make them errors to report as such
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            reader = _reader_class()(path, mode="c")  # copy-on-write, so torch gets writable (unshared) pages
            if reader.byte_order != "I":
                raise ValueError("its byte order is not this machine's (a big-endian file?)")
            field = reader.fields.get("general.architecture")
            architecture = None
            if field is not None and field.types == [gguf.GGUFValueType.STRING]:
                architecture = bytes(field.parts[-1]).decode("utf-8")
            tensors = {}
            for t in reader.tensors:
                shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
                raw = torch.from_numpy(t.data.reshape(-1).view(np.uint8))
                if t.tensor_type in BLOCKS:
                    check_size(raw, t.tensor_type, shape)
                    raw = raw.reshape(byte_shape(shape, t.tensor_type))
                tensors[t.name] = (int(t.tensor_type), shape, raw)
    except Exception as e:  # the reader raises whatever numpy does on bad bytes: IndexError, ValueError, KeyError...
        raise CheckpointError(f"{path} is not a readable GGUF file ({_one_line(e)})") from e
    return GGUFFile(path, architecture, tensors)


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, tuple[int, Sequence[int], Tensor]],
               architecture: str = "flux") -> None:
    """Write `tensors` (name -> (qtype, torch shape, raw uint8 bytes)) as a GGUF file, atomically."""
    import gguf

    arrays = {}
    for name, (qtype, shape, raw) in tensors.items():
        check_size(raw, qtype, shape)
        arrays[name] = (qtype, raw.detach().cpu().contiguous().reshape(byte_shape(shape, qtype)).numpy())
    with atomic_write(path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture)
        try:
            for name, (qtype, array) in arrays.items():
                # uint8 data with raw_dtype: the writer derives the element shape from the bytes per row
                writer.add_tensor(name, array, raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def quantize_to_raw(tensor: Tensor, qtype: int) -> Tensor:
    """`tensor` quantised to `qtype` by gguf-py's numpy quantiser: raw uint8 bytes, (rows..., bytes per row)."""
    import gguf

    qtype = supported_type(qtype)
    if qtype not in QUANTIZABLE:
        raise ValueError(f"cannot quantise to {qtype.name}: gguf's quantiser writes only {_names(QUANTIZABLE)}")
    shape = byte_shape(tensor.shape, qtype)  # refuses a last dimension that is not whole blocks
    data = tensor.detach().cpu().float().contiguous().numpy()
    quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType(int(qtype)))
    return torch.from_numpy(np.ascontiguousarray(quantized).view(np.uint8).copy()).reshape(shape)
