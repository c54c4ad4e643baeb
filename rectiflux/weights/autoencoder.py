"""Autoencoder checkpoints: a diffusers `vae/` folder or a BFL `ae.safetensors` (ComfyUI's `vae/ae.safetensors` is
the same file), alone or inside a file that holds other models too, read into our AutoEncoder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..flux.autoencoder import AutoEncoder, AutoEncoderConfig
from .bundles import NAMES, find_models, select
from .checkpoint import (
    CheckpointError,
    load_into,
    parse_dtype,
    read_json,
    read_state_dict,
    save_state_dict,
    strip_prefix,
    write_json,
)
from .layout import (
    AUTOENCODER_PREFIXES,
    autoencoder_config_from_shapes,
    autoencoder_diffusers_name,
    autoencoder_from_diffusers,
    autoencoder_to_diffusers,
    is_diffusers_autoencoder,
)


def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                     config: AutoEncoderConfig | None = None, prefix: str | None = None) -> AutoEncoder:
    """Load from a diffusers `vae/` folder (or a pipeline folder holding one) or a BFL `ae.safetensors`.

    A file that holds other models too (a ComfyUI checkpoint: the autoencoder under `vae.` or
    `first_stage_model.`) gives only the autoencoder's tensors: those under `prefix`, else under the prefix its
    tensor names show. The model is built on the meta device and the memory-mapped tensors are assigned to it,
    so the weights are never held twice. `config` overrides the one read from config.json or the shapes.
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / "vae").is_dir():
        path = path / "vae"
    state = read_state_dict(path)
    models = {"vae": prefix} if prefix is not None else find_models(state, path)
    if "vae" in models:
        state = select(state, "vae", models)
    elif models:
        raise CheckpointError(f"{path} holds no autoencoder (it holds: {', '.join(NAMES[k] for k in models)})")
    diffusers = is_diffusers_autoencoder(state)
    if diffusers:
        if not path.is_dir():
            raise CheckpointError(f"{path} holds diffusers-layout weights: pass the folder with its config.json")
        if config is None:
            settings = read_json(path / "config.json")
            try:
                config = AutoEncoderConfig.from_diffusers(settings)
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{path / 'config.json'}: {e}") from None
        state = autoencoder_from_diffusers(state, config)
    else:
        state = strip_prefix(state, AUTOENCODER_PREFIXES)
        config = config or autoencoder_config_from_shapes({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = AutoEncoder(config)
    try:
        load_into(model, state, parse_dtype(dtype), f"autoencoder {path}")
    except CheckpointError as e:
        if not diffusers:
            raise
        n = len(config.block_out_channels)  # name the tensors as the file does
        raise CheckpointError(re.sub(r"[\w.-]+\.(weight|bias)\b", lambda m: autoencoder_diffusers_name(m[0], n),
                                     str(e))) from None
    return model.eval()


def save_autoencoder(model: AutoEncoder, folder: str | os.PathLike) -> None:
    """Write a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    state = autoencoder_to_diffusers(model.state_dict(), model.config)
    save_state_dict(state, folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    write_json(model.config.to_diffusers(), folder / "config.json")  # last, so a folder with a config is whole
