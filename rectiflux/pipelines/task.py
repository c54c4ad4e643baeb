"""What every task module (`text_to_image`, `fill`, `control`, `kontext`) works with: the call's arguments, the
sizes of one generation, and the latents and image conditioning a task prepares for the denoising loop.

A task module provides `resolve(pipe, call)` (its defaults), `check(pipe, call)` (its required inputs),
`geometry(pipe, call)`, `uses_strength(call)`, `prepare(pipe, call, geometry, batch, sigmas)` and
`finish(pipe, call, geometry, pixels)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import images as im
from ..sampling.denoise import Inpainting
from ..sampling.latents import Generators, draw_noise, pack_latents


@dataclass
class Call:
    """The arguments of one pipeline call, defaults filled in."""

    prompt: Any = None
    prompt_2: Any = None
    negative_prompt: Any = None
    negative_prompt_2: Any = None
    true_cfg_scale: float = 1.0
    image: Any = None
    mask_image: Any = None
    masked_image_latents: Tensor | None = None
    control_image: Any = None
    strength: float | None = None
    padding_mask_crop: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    sigmas: Any = None
    guidance_scale: float | None = None
    num_images_per_prompt: int = 1
    generator: Generators = None
    seed: int | None = None
    latents: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None
    negative_prompt_embeds: Tensor | None = None
    negative_pooled_prompt_embeds: Tensor | None = None
    output_type: str = "pil"
    joint_attention_kwargs: dict | None = None
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: list[str] | None = None
    max_sequence_length: int | None = None
    max_area: int = 1024 ** 2
    _auto_resize: bool = True
    progress: Callable[[int, int], None] | None = None
    cache_threshold: float | None = None

    @property
    def num_prompts(self) -> int:
        if self.prompt_embeds is not None:
            return len(self.prompt_embeds)
        return 1 if isinstance(self.prompt, str) or self.prompt is None else len(self.prompt)

    @property
    def num_images(self) -> int:
        return self.num_prompts * self.num_images_per_prompt

    @property
    def do_true_cfg(self) -> bool:
        has_negative = self.negative_prompt is not None or self.negative_prompt_embeds is not None
        return self.true_cfg_scale > 1 and has_negative


@dataclass
class Geometry:
    """The sizes of one generation: asked for (width, height) and generated (the next multiple of 2 x the
    autoencoder's downscale, centre-cropped back after decoding)."""

    width: int
    height: int
    gen_width: int
    gen_height: int
    downscale: int

    @classmethod
    def rounded_up(cls, width: Any, height: Any, downscale: int) -> Geometry:
        multiple = 2 * downscale
        if not (isinstance(width, int) and isinstance(height, int)) or isinstance(width, bool) or isinstance(
                height, bool) or width < 1 or height < 1:
            return cls(width, height, width, height, downscale)  # refused by the pipeline's size check
        return cls(width, height, -(-width // multiple) * multiple, -(-height // multiple) * multiple, downscale)

    @property
    def latent_h(self) -> int:
        return 2 * (self.gen_height // (2 * self.downscale))

    @property
    def latent_w(self) -> int:
        return 2 * (self.gen_width // (2 * self.downscale))

    @property
    def image_seq_len(self) -> int:
        return (self.latent_h // 2) * (self.latent_w // 2)


@dataclass
class Prepared:
    """What a task hands the denoising loop: the first packed latents, the sigmas to run, and the image slots."""

    latents: Tensor
    sigmas: Tensor
    img_ids: Tensor
    img_cond: Tensor | None = None
    img_cond_seq: Tensor | None = None
    img_cond_seq_ids: Tensor | None = None
    inpainting: Inpainting | None = None

    @property
    def tokens(self) -> int:
        """Image tokens the transformer sees at each step (the generated ones and any appended reference)."""
        extra = self.img_cond_seq.shape[1] if self.img_cond_seq is not None else 0
        return self.latents.shape[1] + extra


def size_from(call: Call, image: Any, default: tuple[int, int]) -> None:
    """Missing width / height taken from `image` (one side at a time), else from `default`."""
    if call.width is None or call.height is None:
        src_w, src_h = im.image_size(im.first(image)) if image is not None else default
        call.width, call.height = call.width or src_w, call.height or src_h


def to_output(pixels: np.ndarray, output_type: str) -> list | np.ndarray | Tensor:
    """float32 (B, H, W, 3) pixels in [0, 1] as the output type asks."""
    if output_type == "np":
        return pixels
    if output_type == "pt":
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return im.to_pil(pixels)


def refuse(call: Call, kind: str, names: tuple[str, ...]) -> None:
    """One line for an argument this kind of model does not take (rather than ignoring it)."""
    for name in names:
        if getattr(call, name) is not None:
            raise ValueError(f"{name} does not apply to a {kind} model")


def given_latents(call: Call, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """The caller's `latents`, packed, or None."""
    if call.latents is None:
        return None
    x = call.latents.to(device, dtype)
    return pack_latents(x) if x.ndim == 4 else x


def noise(pipe, call: Call, g: Geometry, batch: int) -> Tensor:
    """Fresh noise in the latents' unpacked shape, drawn as the reference draws it."""
    shape = (batch, pipe.autoencoder.config.latent_channels, g.latent_h, g.latent_w)
    return draw_noise(shape, call.generator, pipe.device, pipe.dtype)


def finish(pipe, call: Call, g: Geometry, pixels: np.ndarray) -> list | np.ndarray | Tensor:
    return to_output(pixels, call.output_type)
