"""Transformer checkpoints: the config read off a diffusers folder or a BFL file, the tensors read one unit at a
time (a diffusers q/k/v triple straight into the rows of our fused weight), and saving in either layout."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..flux.config import FluxConfig
from ..flux.transformer import Flux
from .checkpoint import (
    CheckpointError,
    TensorSpan,
    check_fits,
    file_backed,
    load_into,
    parse_dtype,
    read_json,
    read_keys_and_shapes,
    read_rows,
    read_spans,
    read_state_dict,
    save_state_dict,
    weight_files,
    write_json,
)
from .layout import (
    INPUT_SCALES,
    SWAPPED,
    TRANSFORMER_PREFIXES,
    WEIGHT_SCALES,
    blocks_of,
    is_diffusers_transformer,
    is_scaled_fp8_marker,
    tensor_suffixes,
    transformer_config_from_shapes,
    transformer_parts,
    transformer_to_diffusers,
    unit_of,
)
from .offload import BlockWeights

V = TypeVar("V")


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "transformer").is_dir():
        return path / "transformer"  # a whole pipeline folder
    return path


# Of layout.WEIGHT_SCALES the transformer reads only ComfyUI's scaled-fp8 name: `.weight_scale` beside a transformer
# weight is rectiflux's own per-row int8/float8 scale, whose files load_quantized reads.
WEIGHT_SCALE = WEIGHT_SCALES[0]


def transformer_prefix(keys: Iterable[str], prefix: str | None = None) -> str:
    """The prefix the transformer's tensors carry: `prefix` if given, else the first of TRANSFORMER_PREFIXES every
    key has (a BFL or ComfyUI file), else `model.diffusion_model.` if some keys have it (a file that also holds the
    autoencoder and text encoders), else none."""
    if prefix is not None:
        return prefix
    keys = [k for k in keys if not is_scaled_fp8_marker(k)]
    found = next((p for p in TRANSFORMER_PREFIXES if keys and all(k.startswith(p) for k in keys)), None)
    if found is None and any(k.startswith(TRANSFORMER_PREFIXES[0]) for k in keys):
        found = TRANSFORMER_PREFIXES[0]
    return found or ""


def _ours(keys: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The transformer's entries of a BFL-layout checkpoint under our names: prefix stripped, other models' and
    fp8 input-scale entries dropped."""
    return {k[len(prefix):]: v for k, v in keys.items() if k.startswith(prefix) and not k.endswith(INPUT_SCALES)
            and not is_scaled_fp8_marker(k)}


def read_config(path: str | os.PathLike, axes_dim: tuple[int, ...] | None = None,
                prefix: str | None = None) -> tuple[Path, FluxConfig, bool]:
    """(weights path, config, whether the diffusers layout) of a transformer checkpoint, reading no weight.

    The config comes from config.json for the diffusers layout, else from the tensor shapes (and the config
    our own BFL-layout saves keep in their metadata). `prefix` names the transformer's tensors in a file that
    holds other models too (found by itself for the usual ones).
    """
    path = _resolve(path)
    if path.suffix == ".gguf":
        from .gguf import gguf_config

        return path, gguf_config(path, axes_dim), False
    from ..quantize.nf4 import STATE_MARK

    shapes = read_keys_and_shapes(path)
    if is_diffusers_transformer(shapes) and any(STATE_MARK in k for k in shapes):
        raise CheckpointError(f"{path} is a diffusers-layout transformer quantised with bitsandbytes, which rectiflux "
                              "does not read (its q, k and v are fused at load): use a BFL-layout file such as Forge's "
                              "flux1-dev-bnb-nf4, a GGUF file or an fp8 one")
    if is_diffusers_transformer(shapes):
        config_file = (path if path.is_dir() else path.parent) / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"diffusers-layout weights {path} need their config.json beside them")
        settings = read_json(config_file)
        try:
            cfg = FluxConfig.from_diffusers(settings)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        if axes_dim is not None:
            cfg.axes_dim = tuple(axes_dim)
        return path, cfg, True
    if axes_dim is None:
        axes_dim = _saved_config(path).get("axes_dim")
    ours = _ours(shapes, transformer_prefix(shapes, prefix))
    if not ours:
        raise CheckpointError(f"{path} holds no transformer tensor under the prefix {prefix!r}")
    if any(STATE_MARK in k for k in ours):  # bitsandbytes 4-bit weights: their shapes are in their states
        units = CheckpointUnits(path, None, False, f"BFL transformer {path}", prefix)
        ours = {k: units.shape(k) for k in units.parts}
    return path, transformer_config_from_shapes(ours, axes_dim), False


class CheckpointUnits:
    """The tensors of a transformer checkpoint, by our names, read one unit (a block, an embedder) at a time.

    Only the headers are read up front. `read(unit)` builds each tensor by plain reads into fresh memory: a
    diffusers q/k/v triple is read straight into the rows of the fused weight, so nothing is mapped or copied
    twice. `check(model)` compares names and shapes with the model before any weight is read.
    float8 weights named in `float8` (by load_transformer: the blocks' linears) are handed out as stored with a
    per-row `weight_scale` for QuantizedLinear; other float8 weights of a ComfyUI scaled file come multiplied by
    their scale.
    """

    def __init__(self, path: Path, cfg: FluxConfig | None, diffusers_layout: bool, what: str,
                 prefix: str | None = None):
        from ..quantize.nf4 import parse_state, quant_states, side_keys

        self.path, self.what = path, what
        self._mapped: dict[str, Tensor] | None = None
        self._droppable = False  # whether _mapped really is file mappings, whose pages can be given back
        spans = read_spans(path)
        self.parts: dict[str, list[tuple[TensorSpan, int, int]]] = {}
        self.stored: dict[str, str] = {}  # our name -> stored name, for tensors used exactly as stored
        self.scales: dict[str, TensorSpan] = {}  # our weight name -> its scale_weight (ComfyUI scaled fp8)
        self.float8: set[str] = set()
        # our weight name -> (its bitsandbytes 4-bit state, its side tensors by name); the ones given a BnbLinear
        self.bnb: dict[str, tuple[dict, dict[str, TensorSpan]]] = {}
        self.bnb_compact: set[str] = set()
        if diffusers_layout:
            for ours, theirs in transformer_parts(cfg).items():
                for our_suffix, their_suffix in tensor_suffixes(ours):
                    keys = [f"{t}.{their_suffix}" for t in theirs]
                    if not all(k in spans for k in keys):
                        continue  # check() names what is missing
                    parts = [(span, 0, span.shape[0]) for span in (spans.pop(k) for k in keys)]
                    if ours == SWAPPED:  # stored (scale, shift), ours (shift, scale)
                        span, _, rows = parts[0]
                        parts = [(span, rows // 2, rows), (span, 0, rows // 2)]
                    elif len(keys) == 1:
                        self.stored[f"{ours}.{our_suffix}"] = keys[0]
                    self.parts[f"{ours}.{our_suffix}"] = parts
            renamed = spans  # whatever is left is unexpected: check() names it by its diffusers name
        else:
            prefix = transformer_prefix(spans, prefix)
            renamed = _ours(spans, prefix)
            if not renamed:
                raise CheckpointError(f"{path} holds no transformer tensor under the prefix {prefix!r}")
            for key in [k for k in renamed if k.endswith(WEIGHT_SCALE)]:
                scale = renamed.pop(key)
                if math.prod(scale.shape) != 1:  # read() multiplies by one number
                    raise CheckpointError(f"{what}: {key} has shape {scale.shape}; only per-tensor scales are read")
                self.scales[key.removesuffix(WEIGHT_SCALE) + ".weight"] = scale
            for weight_key, state_key in quant_states(renamed).items():
                span = renamed.pop(state_key)
                state = parse_state(read_rows([(span, 0, span.shape[0])]), f"{what}: {weight_key}")
                sides = {name: renamed.pop(key) for name, key in side_keys(weight_key, renamed).items()}
                if weight_key not in renamed or not {"absmax", "quant_map"} <= sides.keys():
                    raise CheckpointError(f"{what}: the bitsandbytes weight {weight_key} lacks its packed codes or "
                                          "their scales")
                self.bnb[weight_key] = (state, sides)
            self.stored.update({k: prefix + k for k in renamed})
        self.parts.update({k: [(v, 0, v.shape[0] if v.shape else 1)] for k, v in renamed.items()})
        self.units: dict[str, list[str]] = {}
        for key in self.parts:
            self.units.setdefault(unit_of(key), []).append(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.parts[key][0][0].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape as the model takes it: a bitsandbytes weight's own, unless a BnbLinear takes it packed."""
        if key in self.bnb and key not in self.bnb_compact:
            return self.bnb[key][0]["shape"]
        first = self.parts[key][0][0]
        if len(self.parts[key]) == 1:
            return first.shape
        return (sum(stop - start for _, start, stop in self.parts[key]), *first.shape[1:])

    def check(self, model: nn.Module) -> None:
        """Refuse, naming the tensors, a checkpoint whose names or shapes do not fit `model`."""
        shapes = {k: self.shape(k) for k in self.parts}
        shapes |= {_scale_name(k): self.shape(k)[:1] for k in self.float8}
        shapes |= {f"{k.removesuffix('weight')}{name}": span.shape for k in self.bnb_compact
                   for name, span in self.bnb[k][1].items()}
        check_fits(model, shapes, self.what)

    def read(self, unit: str, mapped: bool = False) -> dict[str, Tensor]:
        """The tensors of one unit, named relative to it (`img_attn.qkv.weight` for `double_blocks.3`).

        With `mapped`, tensors used exactly as stored are memory-mapped views of the file (their pages are read,
        from the page cache, as they are used, and belong to the page cache rather than to this process's own
        memory); only the fused ones are read into fresh memory.
        """
        if mapped and self._mapped is None:
            self._mapped = read_state_dict(self.path)  # maps the files; reads no weight
            self._droppable = file_backed(self._mapped.values())
        strip = len(unit) + 1
        out = {}
        for k in self.units.get(unit, []):
            if k in self.bnb:
                out |= {name[strip:]: t for name, t in self.bnb_weight(k).items()}
                continue
            tensor = self._mapped[self.stored[k]] if mapped and k in self.stored else read_rows(self.parts[k]).view(
                self.shape(k))
            scale = read_rows([(self.scales[k], 0, 1)]).float().reshape(()) if k in self.scales else None
            if k in self.float8:
                rows = tensor.shape[0]
                out[_scale_name(k)[strip:]] = torch.ones(rows) if scale is None else scale.expand(rows).clone()
            elif scale is not None:
                tensor = tensor.float() * scale
            out[k[strip:]] = tensor
        return out

    def bnb_weight(self, key: str, dequantized: bool = False) -> dict[str, Tensor]:
        """A bitsandbytes weight as a BnbLinear takes it (packed codes and side tensors, by their names in the
        model), or dequantised to float32 where it is no BnbLinear's (or with `dequantized`)."""
        from ..quantize.nf4 import dequantize

        state, sides = self.bnb[key]
        packed = read_rows(self.parts[key])
        side = {name: read_rows([(span, 0, span.shape[0] if span.shape else 1)]).view(span.shape)
                for name, span in sides.items()}
        if key in self.bnb_compact and not dequantized:
            module = key.removesuffix("weight")
            return {key: packed, **{module + name: t for name, t in side.items()}}
        return {key: dequantize(packed, side["absmax"], side["quant_map"], state["blocksize"], state["shape"],
                                side.get("nested_absmax"), side.get("nested_quant_map"), state["nested_blocksize"],
                                state["nested_offset"])}

    def mapped_tensors(self, unit: str) -> list[Tensor]:
        """The memory-mapped views `read(unit, mapped=True)` hands out, whose pages can be given back and mapped
        ahead (`advise_mapped`); none before the first such read, or if the files were not really mapped."""
        if not self._droppable:
            return []
        return [self._mapped[self.stored[k]] for k in self.units.get(unit, []) if k in self.stored]


def _scale_name(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + "weight_scale"


BLOCK_MODES = ("memory", "lazy", "stream")


def load_transformer(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
                     axes_dim: tuple[int, ...] | None = None, device: torch.device | str | None = None,
                     blocks: str = "memory", prepare: Callable[[nn.Module], None] | None = None,
                     prefix: str | None = None) -> Flux:
    """Load a FLUX.1 transformer from a diffusers folder, a BFL or ComfyUI single .safetensors file or a GGUF file.

    The model is built on the meta device and the stored tensors are assigned to it, so the weights are never
    held twice. `blocks` says when the double and single blocks are read: "memory" (now: tensors used as stored
    are memory-mapped, a diffusers folder's q/k/v are read straight into their fused tensors), "lazy" (at first
    use) or "stream" (before every use, freed after it). `prepare(block)` runs on each block once it is in
    memory, in every mode (quantisation uses it). The final layer is read with the blocks (in the diffusers
    layout its modulation's halves are swapped, a copy); the small embedders are read (mapped) at once.
    The blocks' linear weights stored in float8 (ComfyUI's fp8 files, scaled or not) or GGUF-quantised stay so in
    memory, dequantised for each product (QuantizedLinear, GGUFLinear); everything else is cast to `dtype`.
    `prefix` names the transformer's tensors in a file that holds other models too (found by itself for
    `model.diffusion_model.`).
    """
    if blocks not in BLOCK_MODES:
        raise ValueError(f"unknown blocks mode {blocks!r}; use one of {', '.join(BLOCK_MODES)}")
    path, cfg, diffusers_layout = read_config(path, axes_dim, prefix)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Flux(cfg)
    block_names = blocks_of(cfg)
    if path.suffix == ".gguf":
        from .gguf import GGUFUnits

        what = f"GGUF transformer {path}"
        units = GGUFUnits(path, what)
    else:
        what = f"{'diffusers' if diffusers_layout else 'BFL'} transformer {path}"
        units = CheckpointUnits(path, cfg, diffusers_layout, what, prefix)
    compact = keep_compact(model, units, block_names)
    units.check(model)
    # Tensors used exactly as stored are memory-mapped; but where every block is rewritten (cast to another
    # dtype, quantised), a mapping would keep the pages it touched resident beside the result, so those read
    # into fresh memory that is freed once the block is rewritten. Compact weights count as rewritten here:
    # their float parts are, and GGUF files are mapped by their reader anyway.
    as_stored = prepare is None and not compact and isinstance(units, CheckpointUnits) and not units.bnb and all(
        dtype in (None, units.dtype(k)) for k in units.parts if units.dtype(k).is_floating_point)
    if blocks == "memory" and as_stored:
        mapped = read_state_dict(path)  # memory-mapped: nothing is read until used
        state = {k: mapped.pop(units.stored[k]) if k in units.stored else read_rows(units.parts[k]).view(units.shape(k))
                 for k in units.parts}
        del mapped
        load_into(model, state, dtype, what)
    else:
        on_demand = [*block_names, "final_layer"]
        for unit in units.units.keys() - set(on_demand):
            load_into(model.get_submodule(unit), units.read(unit, mapped=as_stored), dtype, what)

        def cast_and_prepare(block: nn.Module, dtype: torch.dtype | None) -> None:
            if dtype is not None:
                block.to(dtype)  # compact weights keep their dtype (QuantizedLinear, GGUFLinear)
            if prepare is not None and block is not model.final_layer:  # `prepare` is for blocks
                prepare(block)

        # GGUF bytes are used as the reader maps them, like tensors used as stored; quantised again by `prepare`,
        # their pages are given back
        gguf = not isinstance(units, CheckpointUnits)
        weights = BlockWeights(units, "stream" if blocks == "stream" else "lazy", on_demand, cast_and_prepare,
                               mapped=as_stored or gguf, dtype=dtype, rewrites=gguf and prepare is not None)
        if blocks == "memory":  # one block at a time: peak is the rewritten model plus one block as stored
            device_now = model.img_in.weight.device
            for name in on_demand:
                weights.before(name, model.get_submodule(name), device_now)
        else:
            model.block_weights = weights
    model.checkpoint = units  # where float weights can be read again (fusing a LoRA into 8-bit weights)
    model = model.eval()
    return model.to(device) if device is not None else model


def keep_compact(model: Flux, units, block_names: list[str]) -> bool:
    """Swap the blocks' linears whose weights `units` stores in float8 or GGUF-quantised for the modules that use
    them as stored (and tell `units` which), so a compact file stays compact in memory; whether there were any.

    Only the blocks' linears: they hold nearly all the weights, and the embedders must stay float (Flux takes its
    dtype from img_in).
    """
    from ..quantize.linear import FLOAT8_DTYPES, QuantizedLinear, replace_module

    blocks = set(block_names)
    found = False
    for key in list(units.parts):
        name = key.removesuffix(".weight")
        if not key.endswith(".weight") or unit_of(key) not in blocks:
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            continue  # check() names it as unexpected
        if not isinstance(linear, nn.Linear):
            continue
        if getattr(units, "quantized", {}).get(key) is not None:
            from ..quantize.gguf import GGUFLinear

            module = GGUFLinear(linear.in_features, linear.out_features, units.quantized[key],
                                bias=linear.bias is not None, device="meta")
            units.compact.add(key)
        elif key in getattr(units, "bnb", {}):
            from ..quantize.nf4 import BnbLinear

            state, sides = units.bnb[key]
            module = BnbLinear(linear.in_features, linear.out_features, state["blocksize"], "nested_absmax" in sides,
                               bias=linear.bias is not None, nested_blocksize=state["nested_blocksize"],
                               nested_offset=state["nested_offset"], device="meta")
            units.bnb_compact.add(key)
        elif units.dtype(key) in FLOAT8_DTYPES:
            module = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, "float8",
                                     device="meta")
            units.float8.add(key)
        else:
            continue
        replace_module(model, name, module)
        found = True
    return found


def _saved_config(path: Path) -> dict:
    """The config we store in a BFL-layout file's metadata (BFL's own files carry none)."""
    with safe_open(str(weight_files(path)[0]), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        return json.loads(meta.get("rectiflux_config", "{}"))
    except ValueError:
        return {}


def save_transformer(model: Flux, path: str | os.PathLike, layout: str = "diffusers") -> None:
    """Save in the diffusers layout (a folder diffusers can read) or the BFL layout (one .safetensors file)."""
    state = model.state_dict()
    cfg = model.config
    if layout == "diffusers":
        path = Path(path)
        save_state_dict(transformer_to_diffusers(state, cfg), path / "diffusion_pytorch_model.safetensors",
                        {"format": "pt"})
        write_json(cfg.to_diffusers(), path / "config.json")
    elif layout == "bfl":
        save_state_dict(state, path, {"format": "pt", "rectiflux_config": json.dumps(asdict(cfg))})
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'diffusers' or 'bfl'")
