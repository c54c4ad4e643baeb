"""Quantised transformer files: one safetensors file holding each quantised weight under its usual name in
int8 / float8_e4m3fn, its scale as `<module>.weight_scale`, every other tensor as it was, and the FluxConfig (json)
and the weight format in the metadata, so `load_quantized` needs nothing beside the file. `quantize_file` converts
a float checkpoint block by block.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..flux.config import FluxConfig
from ..flux.transformer import Flux
from ..weights.checkpoint import CheckpointError, load_into, parse_dtype, read_state_dict, save_state_dict, weight_files
from ..weights.layout import blocks_of
from ..weights.offload import BlockWeights
from ..weights.transformer import BLOCK_MODES, CheckpointUnits, read_config
from .linear import (
    DEFAULT_SKIP,
    FLOAT8_DTYPES,
    WEIGHT_DTYPES,
    QuantizedLinear,
    check_format,
    check_skip,
    quantize_linears,
    replace_module,
)

METADATA_CONFIG = "rectiflux_config"  # the same key save_transformer uses for its BFL files
METADATA_FORMAT = "rectiflux_quantization"
SCALE_SUFFIX = ".weight_scale"

def _model_format(model: nn.Module) -> str:
    formats = {m.weights for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not formats:
        raise ValueError("the model has no QuantizedLinear: run quantize_transformer first")
    if len(formats) > 1:
        raise ValueError(f"the model mixes weight formats {sorted(formats)}; a file holds one")
    return formats.pop()


def save_quantized(model: Flux, path: str | os.PathLike) -> None:
    """Write a quantised transformer to one .safetensors file (atomically)."""
    metadata = {"format": "pt", METADATA_FORMAT: _model_format(model),
                METADATA_CONFIG: json.dumps(asdict(model.config))}
    save_state_dict(model.state_dict(), path, metadata)


def _list(items: list[str], limit: int = 4) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a corrupt or truncated file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read {file}: {first}") from None


def _copy_float_parameters(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Give every float parameter its own memory (cast to `dtype` if one is given); quantised buffers stay mapped.

    Two reasons. A memory-mapped tensor sits at whatever offset the file gives it, and the CPU BLAS sums
    in a different order for operands that are not 64-byte aligned, so a float layer read straight from the
    file computes different last bits than the same layer in memory (the int8 kernels do not care). And
    model.to(dtype) would also cast the float8 weights and float32 scales, which are floating-point buffers.
    The float parts are well under 1% of FLUX.1's weights, so the copy costs next to nothing.
    """
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            copy = p.detach().to(dtype or p.dtype, copy=True)
            setattr(module, name, nn.Parameter(copy, requires_grad=p.requires_grad))


def load_quantized(path: str | os.PathLike, activations: str | None = None,
                   dtype: torch.dtype | str | None = None, blocks: str = "memory") -> Flux:
    """Load a file written by `save_quantized` (or `quantize_file`).

    The model is built on the meta device, the modules the file quantises are swapped for QuantizedLinear,
    and the quantised weights are assigned as stored: no float copy of them is ever made. The float parts
    (biases, norms, embedders) get memory of their own, cast to `dtype` if one is given. `blocks` is
    load_transformer's: "memory", "lazy" or "stream" (one block in memory at a time, read before each use).
    """
    dtype = parse_dtype(dtype)
    files = weight_files(path)
    meta = _read_metadata(files[0])
    what = f"quantized transformer {path}"
    weights = meta.get(METADATA_FORMAT)
    if weights not in WEIGHT_DTYPES:
        raise CheckpointError(f"{path} is not a quantized transformer (metadata {METADATA_FORMAT}={weights!r}); "
                              "convert a float checkpoint with quantize_file")
    check_format(weights, activations)
    if blocks not in BLOCK_MODES:
        raise ValueError(f"unknown blocks mode {blocks!r}; use one of {', '.join(BLOCK_MODES)}")
    try:
        cfg = FluxConfig(**json.loads(meta[METADATA_CONFIG]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{what} has no usable {METADATA_CONFIG} metadata: {e}") from None
    units = CheckpointUnits(Path(path), cfg, False, what)
    dtypes = {k: parts[0][0].dtype for k, parts in units.parts.items()}
    with torch.device("meta"):
        model = Flux(cfg)

    quantized = sorted(k[: -len(SCALE_SUFFIX)] for k in dtypes if k.endswith(SCALE_SUFFIX))
    problems, accepted = [], []
    for name in quantized:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue  # no such module at all: check_fits names its tensors as unexpected
        if not isinstance(module, nn.Linear) or name == "img_in":
            problems.append(f"{name}{SCALE_SUFFIX} (no quantizable linear {name})")
            continue
        accepted.append(name)
        replace_module(model, name, QuantizedLinear(module.in_features, module.out_features, module.bias is not None,
                                              weights, activations, device="meta"))
    # check_fits checks names and shapes; the dtypes are checked here, since a float weight beside a scale (or
    # an int8 one without) would load and then compute garbage
    expected = {k: t.dtype for k, t in model.state_dict(keep_vars=True).items()}
    exact = {f"{n}.weight" for n in accepted} | {f"{n}{SCALE_SUFFIX}" for n in accepted}
    for key, stored in dtypes.items():
        if key not in expected:
            continue  # check_fits names it as unexpected
        if key in exact:
            ok, want = stored == expected[key], _dtype_name(expected[key])
        else:
            ok, want = stored.is_floating_point and stored not in FLOAT8_DTYPES, "float"
        if not ok:
            problems.append(f"{key} is {_dtype_name(stored)} (expected {want})")
    if problems:
        raise CheckpointError(f"{what} does not match the model: {_list(problems)}")
    units.check(model)
    if blocks == "memory":
        load_into(model, read_state_dict(path), None, what)  # memory-mapped
        _copy_float_parameters(model, dtype)
    else:
        for unit in units.units.keys() - set(blocks_of(cfg)):
            module = model.get_submodule(unit)
            load_into(module, units.read(unit), None, what)
            _copy_float_parameters(module, dtype)
        # int8 / float8 weights are used as stored (mapped, like blocks="memory"); the float parts are copied
        model.block_weights = BlockWeights(units, blocks, blocks_of(cfg), _copy_float_parameters, mapped=True,
                                           dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# converting float checkpoints block by block

def quantize_file(src: str | os.PathLike, dst: str | os.PathLike, weights: str = "int8",
                  dtype: torch.dtype | str | None = torch.float32, skip: Iterable[str] = DEFAULT_SKIP,
                  axes_dim: tuple[int, ...] | None = None) -> None:
    """Convert a float checkpoint (diffusers folder or BFL file, as load_transformer reads) to a quantized file.

    The checkpoint's headers are checked against the model first; then each unit (a block, an embedder) is read
    into fresh memory in its stored dtype (a diffusers folder's q/k/v straight into the fused rows), its linears
    are quantised and its float weights dropped, so the peak memory is the quantised model plus about one block,
    plus whatever safetensors needs to write the result. `dtype` is the dtype of the parts kept in float
    (float32 by default, like load_transformer), so the result equals
    quantize_transformer(load_transformer(src)).
    """
    check_format(weights, None)
    dtype = parse_dtype(dtype)
    skip = check_skip(skip)
    path, cfg, diffusers_layout = read_config(src, axes_dim)
    what = f"{'diffusers' if diffusers_layout else 'BFL'} transformer {path}"
    with torch.device("meta"):
        model = Flux(cfg)
    units = CheckpointUnits(path, cfg, diffusers_layout, what)
    units.check(model)
    for unit in units.units:
        module = model.get_submodule(unit)
        # quantize_weight widens each weight to float32 by itself, one linear at a time, so casting a bf16 block
        # to float32 first would only double its peak; the float parts left are cast after quantisation
        load_into(module, units.read(unit), None, f"{what} ({unit})")
        quantize_linears(module, unit, weights, None, skip)
        _copy_float_parameters(module, dtype)
    save_quantized(model, dst)
