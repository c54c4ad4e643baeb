"""Checkpoint I/O shared by every model: safetensors only, memory-mapped, strict, atomic.

This module only knows files, folders and state dicts; `layout.py` maps the diffusers and Black Forest Labs names
onto ours, and the loaders beside it build the models.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..files import atomic_write

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


# BFL's first FLUX.1 files were named .sft (flux1-dev.sft, ae.sft); ComfyUI reads both names as safetensors
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line for the user."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files behind `path`: a file, a folder with one file, or a sharded folder with an index."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _files_from_index(path)
        if path.suffix == ".gguf":
            raise CheckpointError(f"{path} is a GGUF file: those are read as FLUX transformers and T5 encoders only")
        if path.suffix not in SAFETENSORS_SUFFIXES:
            raise CheckpointError(f"{path} is not a safetensors file (.safetensors or .sft; pickled checkpoints are "
                                  "never read)")
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors file in {path}")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise CheckpointError(f"{path} holds several .safetensors files and no index: {names}")
    return files


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"unreadable shard index {index}: {e}") from None
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"shard index {index.name} names missing files: {', '.join(missing)}")
    return files


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_state_dict(path: str | os.PathLike, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint.

    By default the file is memory-mapped: loading is fast and nothing is read until a tensor is used. With
    `mmap=False` each tensor is read into its own fresh allocation: slower to load, but tensors that are
    transformed at load (the diffusers layout's q/k/v, concatenated) then do not stay resident twice, once as
    mapped pages and once as the result (docs/benchmarks.md has both measured).
    """
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:  # validates the header
                if mmap:
                    for key in f.keys():
                        state[key] = f.get_tensor(key)
                    continue
                keys = list(f.keys())
            state.update(_read_tensors(file, keys))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises several types for a corrupt or truncated file
            raise CheckpointError(f"cannot read {file}: {_first_line(e)}") from None
    return state


def _read_tensors(file: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        for key in keys:
            info = header[key]
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
            tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            raw = tensor.reshape(-1).view(torch.uint8)
            if end - begin != raw.numel():
                raise CheckpointError(f"{file}: tensor {key} has {end - begin} bytes for shape {info['shape']}")
            fh.seek(8 + size + begin)
            if raw.numel() and fh.readinto(memoryview(raw.numpy())) != raw.numel():
                raise CheckpointError(f"{file} is truncated (tensor {key})")
            out[key] = tensor
    return out


_MADVISE = {"drop": 4, "populate": 22}  # Linux MADV_DONTNEED, MADV_POPULATE_READ (kernel 5.14+)
# Where "drop" really gives mapped pages back. Elsewhere a streamed model copies its blocks out of the file instead.
CAN_DROP_MAPPED_PAGES = sys.platform == "linux"


def file_backed(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the bytes of every non-empty tensor lie in a mapping of a file (Linux's /proc/self/maps).

    `read_state_dict` maps files through safetensors; this checks that it really did before any page of them is
    given back (`advise_mapped`), so a safetensors that one day copied instead could not have its data zeroed.
    """
    if not CAN_DROP_MAPPED_PAGES:
        return False
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):  # a path: a file, not the heap or anonymous memory
                lo, hi = fields[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    spans.sort()
    starts = [lo for lo, _ in spans]
    for t in tensors:
        if t.nbytes:
            i = bisect.bisect_right(starts, t.data_ptr()) - 1
            if i < 0 or t.data_ptr() + t.nbytes > spans[i][1]:
                return False
    return True


@functools.cache
def _libc():  # loaded once: a block's pages are advised twice per denoising step
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def advise_mapped(tensors: Iterable[torch.Tensor], advice: str) -> None:
    """Tell the kernel about the whole pages inside memory-mapped checkpoint tensors (Linux; a no-op elsewhere).

    "drop" unmaps them from this process: they stay in the page cache (shared, reclaimable, not this process's
    resident memory) and the next use maps them again from there, or re-reads the file if the cache let them go.
    That is only right for read-only file mappings (anonymous memory would be zeroed): callers pass only tensors
    `file_backed` accepted. "populate" maps them now (from another thread, so the thread using them next does not
    fault).
    """
    if not CAN_DROP_MAPPED_PAGES:
        return
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    for t in tensors:
        start = -(-t.data_ptr() // page) * page  # only pages wholly inside the tensor: neighbours keep theirs
        end = (t.data_ptr() + t.nbytes) // page * page
        if end > start:
            _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADVISE[advice])


class TensorSpan:
    """Where a stored tensor's bytes lie: its file, dtype, shape and absolute byte offset."""

    __slots__ = ("file", "dtype", "shape", "offset")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], offset: int):
        self.file, self.dtype, self.shape, self.offset = file, dtype, shape, offset

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape[1:]:
            n *= d
        return n


def read_spans(path: str | os.PathLike) -> dict[str, TensorSpan]:
    """Every tensor's TensorSpan, from the headers alone (validated by safetensors first)."""
    spans: dict[str, TensorSpan] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu"):
                pass  # refuses corrupt headers and files shorter than their header says
            with open(file, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {_first_line(e)}") from None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
            offset = 8 + size + info["data_offsets"][0]
            spans[key] = TensorSpan(file, _DTYPES[info["dtype"]], tuple(info["shape"]), offset)
    return spans


def read_rows(parts: list[tuple[TensorSpan, int, int]]) -> torch.Tensor:
    """One fresh tensor made of row ranges [start, stop) of stored tensors, stacked in order, by plain reads.

    This is how a fused weight (q, k and v of a diffusers checkpoint) is built without first mapping the parts:
    each part's bytes are read straight into its rows of the result.
    """
    first = parts[0][0]
    rows = sum(stop - start for _, start, stop in parts)
    out = torch.empty((rows, *first.shape[1:]), dtype=first.dtype)
    raw = out.reshape(-1).view(torch.uint8).numpy()
    at = 0
    for span, start, stop in parts:
        n = (stop - start) * span.row_bytes
        fd = os.open(span.file, os.O_RDONLY)
        try:
            if n and os.preadv(fd, [memoryview(raw[at: at + n])], span.offset + start * span.row_bytes) != n:
                raise CheckpointError(f"{span.file} is truncated")
        finally:
            os.close(fd)
        at += n
    return out


def read_keys_and_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes without reading any weight (enough to infer a config)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as e:
            raise CheckpointError(f"cannot read {file}: {_first_line(e)}") from None
    return shapes


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def strip_prefix(state: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop the first of `prefixes` that every key carries (e.g. BFL's `model.diffusion_model.`)."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _names(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_fits(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Refuse tensors (by name and shape) that do not fit `model`, with one line naming them."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = expected.keys() - shapes.keys()
    unexpected = shapes.keys() - expected.keys()
    wrong = [f"{k} {tuple(shapes[k])} (expected {expected[k]})"
             for k in expected.keys() & shapes.keys() if tuple(shapes[k]) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {_names(wrong, 3)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(problems))


def load_into(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype | None, what: str) -> nn.Module:
    """Assign `state` to a model built on the meta device, refusing any mismatch with a message naming the tensors.

    The tensors are moved into the module (not copied) and `state` is emptied as it goes, so the weights
    live once in memory even while they are cast. Only parameters are cast to `dtype`: the models' buffers are
    quantised weights and their scales (rectiflux.quantize), which must stay as stored.
    """
    check_fits(model, {k: tuple(v.shape) for k, v in state.items()}, what)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key in list(state):
        tensor = state.pop(key)
        if dtype is not None and tensor.is_floating_point() and key in params:
            tensor = tensor.to(dtype)
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if key in params:
            setattr(module, attr, nn.Parameter(tensor, requires_grad=params[key].requires_grad))
        else:
            module.register_buffer(attr, tensor, persistent=key in buffers)
    return model


def save_state_dict(state: Mapping[str, torch.Tensor], file: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (whole or not at all)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_write(file) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_json(obj: dict, file: str | os.PathLike) -> None:
    with atomic_write(file) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(file: str | os.PathLike) -> dict:
    try:
        value = json.loads(Path(file).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file}: {_first_line(e)}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object")
    return value
