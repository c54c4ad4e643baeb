"""`rectiflux.load`: a whole pipeline from a diffusers folder, a BFL single file, a repo id in the local HF cache or
an embedded model, with its kind (text-to-image, Fill, Control, Kontext) detected and its defaults read."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..flux.config import FluxConfig
from ..sampling.schedule import SchedulerConfig
from ..weights.autoencoder import load_autoencoder
from ..weights.checkpoint import CheckpointError, parse_dtype, read_json, read_keys_and_shapes
from ..weights.layout import is_diffusers_transformer
from ..weights.sources import resolve_source
from ..weights.text_encoders import load_text_encoders
from ..weights.transformer import BLOCK_MODES, load_transformer, read_config
from .flux import KINDS, Defaults, FluxPipeline

QUANTIZE_MODES = {"int8": ("int8", None), "int8-dynamic": ("int8", "int8"), "float8": ("float8", None)}
# diffusers pipeline class -> kind
PIPELINE_CLASSES = {"FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
                    "FluxFillPipeline": "fill", "FluxControlPipeline": "control", "FluxKontextPipeline": "kontext"}


def in_channels_of(kind: str, latent_channels: int, downscale: int) -> int:
    """The transformer input width of a variant: packed noise, plus the conditioning it concatenates on channels."""
    base = 4 * latent_channels
    return {"flux": base, "kontext": base, "control": 2 * base, "fill": 2 * base + 4 * downscale ** 2}[kind]


def detect_kind(cfg: FluxConfig, latent_channels: int, downscale: int, name: str = "",
                pipeline_class: str | None = None, kind: str | None = None) -> str:
    """The variant a transformer is: from its input width, then (dev and Kontext share one) from the diffusers
    pipeline class, the file or folder name, or an explicit `kind`."""
    widths = {}
    for k in ("flux", "control", "fill"):
        widths.setdefault(in_channels_of(k, latent_channels, downscale), k)
    known = ", ".join(f"{w} ({'text-to-image or Kontext' if k == 'flux' else k})" for w, k in widths.items())
    if cfg.in_channels not in widths or cfg.out_channels != 4 * latent_channels:
        raise CheckpointError(f"a transformer with in_channels {cfg.in_channels} and out_channels {cfg.out_channels} "
                              f"is no FLUX.1 variant rectiflux knows (in_channels: {known})")
    found = widths[cfg.in_channels]
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        if in_channels_of(kind, latent_channels, downscale) != cfg.in_channels:
            raise CheckpointError(f"kind {kind!r} needs in_channels {in_channels_of(kind, latent_channels, downscale)}"
                                  f", but this transformer has {cfg.in_channels} ({found})")
        return kind
    if found == "flux" and (PIPELINE_CLASSES.get(pipeline_class or "") == "kontext" or "kontext" in name.lower()):
        return "kontext"
    return found


def read_defaults(folder: Path | None, transformer_config: FluxConfig, downscale: int, kind: str,
                  name: str = "") -> Defaults:
    """The model's defaults: its rectiflux.json where it has one, else those of its kind (diffusers' own)."""
    d = Defaults()
    d.width = d.height = 128 * downscale  # diffusers' default_sample_size
    if not transformer_config.guidance_embed:  # schnell-like: few steps, no guidance, shorter T5 context
        d.steps, d.guidance, d.max_sequence_length = 4, 0.0, 256
    elif kind == "fill":
        d.steps, d.guidance = 50, 30.0
    elif kind == "control":  # BFL's recommendations: Depth 10, Canny 30
        d.steps, d.guidance = (30, 10.0) if "depth" in name.lower() else (50, 30.0)
    elif kind == "kontext":
        d.guidance = 2.5
    file = folder / "rectiflux.json" if folder is not None else None
    if file is None or not file.exists():
        return d
    fields = {f.name: f for f in dataclasses.fields(Defaults)}
    for key, value in read_json(file).items():
        if key == "kind":
            continue  # read by load()
        if key not in fields:
            raise CheckpointError(f"{file}: unknown setting {key!r} (known: {', '.join(fields)}, kind)")
        try:
            if key == "known_sizes":
                value = tuple((int(w), int(h)) for w, h in value)
            elif key == "known_words":
                value = frozenset(str(w) for w in value)
            else:
                kind_of = type(getattr(d, key))
                if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                        kind_of is int and value != int(value)):
                    raise ValueError(f"{value!r} is not a {kind_of.__name__}")
                value = kind_of(value)
                if value <= 0 and key != "guidance":
                    raise ValueError(f"{value!r} must be positive")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: bad value for {key}: {e}") from None
        setattr(d, key, value)
    d.__post_init__()
    return d


def _beside(path: Path, name: str) -> Path | None:
    found = path.parent / name
    return found if found.exists() else None


def _check_single_file(path: Path) -> None:
    """A diffusers transformer file handed over alone would load without its pipeline: say what to pass instead."""
    if not is_diffusers_transformer(read_keys_and_shapes(path)):
        return
    folder = path.parent.parent if path.parent.name == "transformer" else None
    if folder is not None and (folder / "model_index.json").exists():
        raise CheckpointError(f"{path} is the transformer of the diffusers folder {folder}: pass the folder")
    raise CheckpointError(f"{path} is a diffusers-layout transformer, not a BFL single file: pass the diffusers "
                          "pipeline folder that holds it (with model_index.json)")


def load(source: str | os.PathLike = "shapes", dtype: torch.dtype | str | None = torch.float32,
         device: str | torch.device = "cpu", vae: str | os.PathLike | None = None,
         text_encoders: str | os.PathLike | None = None, quantize: str | None = None,
         blocks: str = "lazy", kind: str | None = None) -> FluxPipeline:
    """Load a whole pipeline.

    `source` is a diffusers-layout folder, a BFL transformer .safetensors file (with `vae=` the BFL ae.safetensors
    and `text_encoders=` a diffusers folder or repo id holding the CLIP and T5 subfolders, both found beside the
    file when not given), a Hugging Face repo id in the local cache, or the name of an embedded model ('shapes').
    The kind (text-to-image, Fill, Control or Kontext) is read off the transformer's input width and, for Kontext
    (which has dev's weights), the diffusers pipeline class or the name; `kind=` says it outright.
    `quantize` ("int8", "int8-dynamic" for int8 activations too, or "float8") stores the transformer blocks'
    linear layers in 8 bits with per-channel scales, each block as it is read.
    `blocks` says when the transformer's blocks are read from disk: "lazy" (at first use: loading takes the
    time to read the headers), "memory" (now) or "stream" (before every use and freed after it: peak memory
    is about one block, for machines that cannot hold the model; slower, since every step reads the file).
    """
    from .flux import check_device

    dtype = parse_dtype(dtype)
    device = check_device(device)
    if blocks not in BLOCK_MODES:
        raise ValueError(f"unknown blocks mode {blocks!r}; use one of {', '.join(BLOCK_MODES)}")
    prepare = None
    if quantize is not None:
        from ..quantize.linear import block_quantizer

        if quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
        if blocks == "stream":
            raise ValueError("quantize with blocks='stream' would quantise every block at every step; convert the "
                             "checkpoint once with rectiflux.quantize.quantize_file and stream that")
        prepare = block_quantizer(*QUANTIZE_MODES[quantize])
    path = resolve_source(source)
    pipeline_class, folder = None, None
    if path.is_file():  # a BFL single file
        _check_single_file(path)
        transformer_path = path
        vae_path = Path(vae) if vae else _beside(path, "ae.safetensors")
        if vae_path is None:
            raise CheckpointError(f"no autoencoder for the BFL file {path}: pass vae= (--vae) the BFL ae.safetensors "
                                  "or a diffusers vae/ folder (none is beside the file)")
        encoders_dir = resolve_source(text_encoders) if text_encoders else path.parent
        if not (encoders_dir / "text_encoder_2").is_dir():
            raise CheckpointError(f"no text encoders for the BFL file {path}: pass text_encoders= (--text-encoders) a "
                                  f"diffusers FLUX folder or repo id holding text_encoder, tokenizer, text_encoder_2, "
                                  f"tokenizer_2 (none is beside the file)")
    else:
        if not (path / "transformer").is_dir():
            raise CheckpointError(f"{path} is not a diffusers FLUX folder (no transformer/ subfolder)")
        transformer_path, folder = path / "transformer", path
        vae_path = Path(vae) if vae else path / "vae"
        encoders_dir = resolve_source(text_encoders) if text_encoders else path
        if (path / "model_index.json").exists():
            pipeline_class = read_json(path / "model_index.json").get("_class_name")
        if kind is None and (path / "rectiflux.json").exists():
            kind = read_json(path / "rectiflux.json").get("kind")
    _, transformer_config, _ = read_config(transformer_path)
    autoencoder = load_autoencoder(vae_path, dtype=dtype)
    cfg = autoencoder.config
    found = detect_kind(transformer_config, cfg.latent_channels, cfg.downscale, path.name, pipeline_class, kind)
    transformer = load_transformer(transformer_path, dtype=dtype, blocks=blocks, prepare=prepare)
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").exists():
        scheduler = SchedulerConfig.from_diffusers(read_json(folder / "scheduler" / "scheduler_config.json"))
    else:
        dev_like = transformer_config.guidance_embed
        scheduler = SchedulerConfig(shift=3.0 if dev_like else 1.0, use_dynamic_shifting=dev_like)
    encoders = load_text_encoders(encoders_dir, dtype=dtype)
    defaults = read_defaults(folder, transformer_config, cfg.downscale, found, path.name)
    pipe = FluxPipeline(transformer.to(device), autoencoder.to(device), encoders.to(device), scheduler, defaults,
                        name=path.name, kind=found)
    pipe.source = path
    return pipe
