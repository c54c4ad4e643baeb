"""FLUX.1-Redux: image variation. A prior turns images into prompt embeddings that any FLUX pipeline takes.

SigLIP's last hidden state (transformers' SiglipVisionModel, read from safetensors) goes through the Redux projector
and is appended after the T5 tokens; both embeddings are scaled per image and summed over the images, exactly as
diffusers' FluxPriorReduxPipeline does. Without a prompt (or without text encoders) the text part is zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import images as im
from ..flux.redux import ReduxConfig, ReduxProjector
from ..flux.text_encoders import TextEncoders
from ..weights.checkpoint import (
    CheckpointError,
    load_into,
    parse_dtype,
    read_json,
    read_keys_and_shapes,
    read_state_dict,
    strip_prefix,
    weight_files,
)
from ..weights.sources import resolve_source

DEFAULT_POOLED_WIDTH = 768  # CLIP-L's, what diffusers assumes without text encoders
REDUX_PREFIXES = ("model.", "redux.")


@dataclass
class ReduxOutput:
    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor


class ReduxPrior:
    """`prior(image)` -> ReduxOutput(prompt_embeds, pooled_prompt_embeds) for `pipe(prompt_embeds=...,
    pooled_prompt_embeds=...)`."""

    def __init__(self, image_encoder: torch.nn.Module, image_processor: Any, projector: ReduxProjector,
                 text_encoders: TextEncoders | None = None, max_sequence_length: int = 512):
        self.image_encoder, self.image_processor, self.projector = image_encoder.eval(), image_processor, projector
        self.text_encoders, self.max_sequence_length = text_encoders, max_sequence_length

    @property
    def device(self) -> torch.device:
        return self.projector.redux_up.weight.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ReduxPrior:
        self.image_encoder.to(device, dtype)
        self.projector.to(device, dtype)
        return self

    @torch.no_grad()
    def __call__(self, image: Any, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
                 prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                 prompt_embeds_scale: float | list[float] = 1.0,
                 pooled_prompt_embeds_scale: float | list[float] = 1.0, return_dict: bool = True):
        images = im.open_images(image)
        n = images.shape[0] if isinstance(images, Tensor) else len(images) if isinstance(images, list) else 1
        scales = {}
        for name, scale in (("prompt_embeds_scale", prompt_embeds_scale),
                            ("pooled_prompt_embeds_scale", pooled_prompt_embeds_scale)):
            values = [float(scale)] * n if isinstance(scale, (int, float)) else [float(s) for s in scale]
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} weights for {n} images")
            scales[name] = values
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give prompt or prompt_embeds, not both")
        if isinstance(prompt, list) and len(prompt) != n:
            raise ValueError(f"got {len(prompt)} prompts for {n} images")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")

        device, dtype = self.device, next(self.image_encoder.parameters()).dtype
        pixels = self.image_processor(images=[im.to_8bit(i) for i in images] if isinstance(images, list)
                                      else im.to_8bit(images), return_tensors="pt")["pixel_values"]
        features = self.image_encoder(pixel_values=pixels.to(device, dtype)).last_hidden_state
        image_embeds = self.projector(features.to(self.projector.redux_up.weight.dtype)).to(device)

        if prompt_embeds is None:
            if self.text_encoders is not None and prompt is not None:
                prompts = n * [prompt] if isinstance(prompt, str) else prompt
                prompt_embeds, pooled_prompt_embeds = self.text_encoders.encode(prompts, prompt_2, 1,
                                                                                self.max_sequence_length)
            else:
                width = self.text_encoders.clip.config.hidden_size if self.text_encoders else DEFAULT_POOLED_WIDTH
                prompt_embeds = image_embeds.new_zeros(n, self.max_sequence_length, image_embeds.shape[-1])
                pooled_prompt_embeds = image_embeds.new_zeros(n, width)
        prompt_embeds = torch.cat([prompt_embeds.to(device, image_embeds.dtype), image_embeds], dim=1)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device, image_embeds.dtype)
        prompt_embeds = prompt_embeds * torch.tensor(scales["prompt_embeds_scale"], device=device,
                                                     dtype=image_embeds.dtype)[:, None, None]
        pooled_prompt_embeds = pooled_prompt_embeds * torch.tensor(scales["pooled_prompt_embeds_scale"],
                                                                   device=device, dtype=image_embeds.dtype)[:, None]
        # the images' embeddings are one weighted sum: several images make one mixed prompt
        out = ReduxOutput(prompt_embeds.sum(0, keepdim=True), pooled_prompt_embeds.sum(0, keepdim=True))
        return out if return_dict else (out.prompt_embeds, out.pooled_prompt_embeds)


def _siglip(folder: Path, dtype: torch.dtype | None):
    from transformers import SiglipVisionModel

    try:
        from transformers import SiglipImageProcessorPil as Processor
    except ImportError:  # transformers 4: the PIL processor had the plain name
        from transformers import SiglipImageProcessor as Processor

    weight_files(folder)  # safetensors only: refuses a folder of pickles before transformers sees it
    model = SiglipVisionModel.from_pretrained(folder, use_safetensors=True, local_files_only=True,
                                              dtype=dtype or torch.float32)
    processor_dir = folder.parent / "feature_extractor" if (folder.parent / "feature_extractor").is_dir() else folder
    return model, Processor.from_pretrained(processor_dir, local_files_only=True)


def load_projector(path: Path, dtype: torch.dtype | None) -> ReduxProjector:
    """The projector from a diffusers `image_embedder/` folder or a BFL `flux1-redux-dev.safetensors`."""
    shapes = strip_prefix(read_keys_and_shapes(path), REDUX_PREFIXES)
    try:
        redux_dim, txt = shapes["redux_up.weight"][1], shapes["redux_down.weight"][0]
    except (KeyError, IndexError):
        raise CheckpointError(f"{path} is not a FLUX.1-Redux projector (no redux_up / redux_down weights)") from None
    if path.is_dir() and (path / "config.json").exists():
        settings = read_json(path / "config.json")
        redux_dim, txt = settings.get("redux_dim", redux_dim), settings.get("txt_in_features", txt)
    with torch.device("meta"):
        projector = ReduxProjector(ReduxConfig(redux_dim, txt))
    state = strip_prefix(read_state_dict(path), REDUX_PREFIXES)
    return load_into(projector, state, dtype, f"Redux projector {path}").eval()


def load_redux(source: str | os.PathLike, siglip: str | os.PathLike | None = None,
               text_encoders: TextEncoders | str | os.PathLike | None = None,
               dtype: torch.dtype | str | None = torch.float32, device: str | torch.device = "cpu") -> ReduxPrior:
    """A Redux prior from a diffusers FLUX.1-Redux folder (image_encoder/, feature_extractor/, image_embedder/), a
    repo id in the local HF cache, or a BFL `flux1-redux-dev.safetensors` with `siglip=` a SigLIP folder (or repo id:
    google/siglip-so400m-patch14-384). `text_encoders` (a pipeline's, or a diffusers folder holding them) encode a
    prompt given with the image; without them the text part is zeros, as in diffusers."""
    dtype = parse_dtype(dtype)
    path = resolve_source(source)
    if path.is_dir():
        if not (path / "image_embedder").is_dir():
            raise CheckpointError(f"{path} is not a FLUX.1-Redux folder (no image_embedder/ subfolder)")
        projector = load_projector(path / "image_embedder", dtype)
        siglip_dir = resolve_source(siglip) if siglip is not None else path / "image_encoder"
    else:
        projector = load_projector(path, dtype)
        if siglip is None:
            raise CheckpointError(f"{path} holds the Redux projector only: pass siglip= the SigLIP vision model "
                                  "(a folder or google/siglip-so400m-patch14-384 in the local HF cache)")
        siglip_dir = resolve_source(siglip)
    if (siglip_dir / "image_encoder").is_dir():
        siglip_dir = siglip_dir / "image_encoder"
    if not siglip_dir.is_dir():
        raise CheckpointError(f"no SigLIP vision model folder at {siglip_dir}")
    encoder, processor = _siglip(siglip_dir, dtype)
    if encoder.config.hidden_size != projector.config.redux_dim:
        raise CheckpointError(f"SigLIP {siglip_dir} is {encoder.config.hidden_size} wide but the projector takes "
                              f"{projector.config.redux_dim}")
    if text_encoders is not None and not isinstance(text_encoders, TextEncoders):
        from ..weights.text_encoders import load_text_encoders

        text_encoders = load_text_encoders(resolve_source(text_encoders), dtype)
    return ReduxPrior(encoder, processor, projector, text_encoders).to(device)
