"""Text-to-image, img2img and inpainting: the sampler, the transformer, the autoencoder and the text encoders composed.

Random numbers are drawn in the reference's order and shapes (the source image's posterior sample first, then
the noise in the unpacked latent shape), so a seed gives the same image here as in diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import images as im
from .autoencoder import AutoEncoder, load_autoencoder
from .checkpoint import CheckpointError, parse_dtype, read_json
from .heap import released_after
from .sampler import (
    Generators,
    SchedulerConfig,
    draw_noise,
    euler_step,
    get_sigmas,
    latent_image_ids,
    noise_latents,
    pack_latents,
    strength_start,
    text_ids,
    unpack_latents,
)
from .text_encoders import TextEncoders
from .transformer import FirstBlockCache, Flux, load_transformer

MAX_SIDE = 8192


@dataclass
class PipelineOutput:
    images: list | np.ndarray | Tensor
    seeds: list[int] | None = None
    cached_steps: int = 0  # steps whose later transformer blocks the step cache skipped


@dataclass
class Defaults:
    """Per-model defaults, read from the model folder (`rectiflux.json`) or guessed from the model kind."""

    steps: int = 28
    guidance: float = 3.5
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512
    strength: float = 0.6
    extra: dict = field(default_factory=dict)


class FluxPipeline:
    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoders: TextEncoders | None,
                 scheduler: SchedulerConfig, defaults: Defaults | None = None, name: str = "flux"):
        self.transformer, self.autoencoder, self.text_encoders = transformer, autoencoder, text_encoders
        self.scheduler, self.name = scheduler, name
        self.defaults = defaults or Defaults()

    @property
    def vae_scale_factor(self) -> int:
        return self.autoencoder.config.downscale

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, device: str | torch.device) -> FluxPipeline:
        self.transformer.to(device)
        self.autoencoder.to(device)
        if self.text_encoders is not None:
            self.text_encoders.clip.to(device)
            self.text_encoders.t5.to(device)
        return self

    # ------------------------------------------------------------------------------------------------------------
    @released_after
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        padding_mask_crop: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: Generators = None,
        seed: int | None = None,
        latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        output_type: str = "pil",
        max_sequence_length: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        cache_threshold: float | None = None,
    ) -> PipelineOutput:
        """Generate images; diffusers' FluxPipeline arguments, plus `seed`, `progress(step, total)` and
        `cache_threshold` (opt-in step caching, see transformer.FirstBlockCache: 0.1 skips the blocks after the
        first on steps whose first-block output changed by less than 10% in all since the last full step)."""
        d = self.defaults
        if num_inference_steps is None:  # like the reference, explicit sigmas set the step count
            num_inference_steps = len(sigmas) if sigmas is not None else d.steps
        steps = num_inference_steps
        guidance_scale = d.guidance if guidance_scale is None else guidance_scale
        if max_sequence_length is None:
            max_sequence_length = d.max_sequence_length
        strength = d.strength if strength is None else strength
        if image is None:
            strength = 1.0
        image, mask_image = im.open_images(image), im.open_images(mask_image)
        if height is None or width is None:  # img2img keeps the source's size; text-to-image the model's default
            src_w, src_h = im.image_size(im.first(image)) if image is not None else (d.width, d.height)
            width, height = width or src_w, height or src_h
        multiple = 2 * self.vae_scale_factor
        gen_w, gen_h = -(-width // multiple) * multiple, -(-height // multiple) * multiple  # round up
        self._check(prompt, prompt_embeds, image, mask_image, strength, steps, width, height, output_type,
                    num_images_per_prompt, padding_mask_crop, true_cfg_scale)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        n_prompts = (1 if isinstance(prompt, str) else len(prompt)) if prompt_embeds is None else len(prompt_embeds)
        if isinstance(generator, list) and len(generator) not in (1, n_prompts * num_images_per_prompt):
            raise ValueError(f"got {len(generator)} generators for {n_prompts * num_images_per_prompt} images")
        if self.text_encoders is not None:  # too-long prompts are refused before any model runs
            if prompt_embeds is None:
                self.text_encoders.check(prompt, prompt_2, max_sequence_length)
            if do_true_cfg and negative_prompt_embeds is None:
                self.text_encoders.check(negative_prompt, negative_prompt_2, max_sequence_length)
        if seed is not None and generator is None:
            generator = torch.Generator("cpu").manual_seed(seed)

        # text
        embeds, pooled = self._encode(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds,
                                      num_images_per_prompt, max_sequence_length)
        if do_true_cfg:
            neg_embeds, neg_pooled = self._encode(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                                  negative_pooled_prompt_embeds, num_images_per_prompt,
                                                  max_sequence_length)
        batch = embeds.shape[0]

        # schedule
        latent_h, latent_w = 2 * (gen_h // multiple), 2 * (gen_w // multiple)
        image_seq_len = (latent_h // 2) * (latent_w // 2)
        all_sigmas = get_sigmas(steps, image_seq_len, self.scheduler, sigmas)
        start = strength_start(steps, strength) if image is not None else 0
        run_sigmas = all_sigmas[start:].to(self.device)
        model_t = all_sigmas[start:-1] * self.scheduler.num_train_timesteps

        # initial latents (and, for inpainting, what the unmasked region is reset to)
        crop_box = None
        if padding_mask_crop is not None:
            crop_box = im.mask_crop_box(mask_image, gen_w, gen_h, padding_mask_crop)
        shape = (batch, self.transformer.config.in_channels // 4, latent_h, latent_w)
        source = noise = None
        if image is not None:
            pixels = im.preprocess_image(image, gen_w, gen_h, crop_box, fill=crop_box is not None)
            source = self._encode_image(pixels.to(self.device), generator, batch)
        if latents is not None:
            x = latents.to(self.device, self.dtype)
            x = pack_latents(x) if x.ndim == 4 else x
        else:
            noise = draw_noise(shape, generator, self.device, self.dtype)
            x = noise if source is None else noise_latents(source, noise, run_sigmas[0])
            x = pack_latents(x)
        mask = None
        if mask_image is not None:
            m = im.preprocess_mask(mask_image, gen_w, gen_h, crop_box, fill=crop_box is not None)
            m = torch.nn.functional.interpolate(m, size=(latent_h, latent_w)).to(self.device, self.dtype)
            if batch % m.shape[0]:
                raise ValueError(f"{m.shape[0]} masks cannot be spread over {batch} images")
            mask = pack_latents(m.repeat(batch // m.shape[0], shape[1], 1, 1))
            packed_source = pack_latents(source)
            packed_noise = pack_latents(noise) if noise is not None else x

        # denoise
        img_ids = latent_image_ids(latent_h, latent_w, self.device, self.dtype)
        txt_ids = text_ids(embeds.shape[1], self.device, self.dtype)
        pe = self.transformer.position_embedding(txt_ids, img_ids)  # the same for every step
        guidance = None
        if self.transformer.config.guidance_embed:
            guidance = torch.full([batch], guidance_scale, device=self.device, dtype=torch.float32)
        n = len(model_t)
        caches = [FirstBlockCache(cache_threshold) for _ in range(2)] if cache_threshold is not None else [None] * 2
        for i in range(n):
            # the reference passes (sigma * 1000) / 1000 rather than sigma: the same rounding keeps seeds exact
            t = model_t[i].expand(batch).to(self.device, self.dtype) / 1000
            v = self.transformer(img=x, img_ids=img_ids, txt=embeds, txt_ids=txt_ids, timesteps=t, y=pooled,
                                 guidance=guidance, pe=pe, cache=caches[0])
            if do_true_cfg:
                v_neg = self.transformer(img=x, img_ids=img_ids, txt=neg_embeds, txt_ids=txt_ids, timesteps=t,
                                         y=neg_pooled, guidance=guidance, pe=pe, cache=caches[1])
                v = v_neg + true_cfg_scale * (v - v_neg)
            x = euler_step(x, v, run_sigmas[i], run_sigmas[i + 1])
            if mask is not None:
                kept = noise_latents(packed_source, packed_noise, run_sigmas[i + 1]) if i < n - 1 else packed_source
                x = (1 - mask) * kept + mask * x
            if callback_on_step_end is not None:
                names = callback_on_step_end_tensor_inputs or ["latents"]
                values = {"latents": x, "prompt_embeds": embeds}
                result = callback_on_step_end(self, i, model_t[i], {k: values[k] for k in names}) or {}
                x, embeds = result.get("latents", x), result.get("prompt_embeds", embeds)
            if progress is not None:
                progress(i + 1, n)

        cached = caches[0].skipped if caches[0] is not None else 0
        if output_type == "latent":
            return PipelineOutput(images=x, cached_steps=cached)
        return PipelineOutput(images=self._decode(x, latent_h, latent_w, width, height, output_type,
                                                  image, mask_image, crop_box), cached_steps=cached)

    # ------------------------------------------------------------------------------------------------------------
    def _check(self, prompt, prompt_embeds, image, mask_image, strength, steps, width, height, output_type,
               num_images_per_prompt, padding_mask_crop, true_cfg_scale) -> None:
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt (or prompt_embeds)")
        if prompt_embeds is None and self.text_encoders is None:
            raise ValueError("this pipeline has no text encoders: pass prompt_embeds and pooled_prompt_embeds")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number >= 1, got {steps}")
        for name, side in (("width", width), ("height", height)):
            if not isinstance(side, int) or side < 16 or side > MAX_SIDE:
                raise ValueError(f"{name} must be a whole number of pixels from 16 to {MAX_SIDE}, got {side}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs an image to inpaint")
        if mask_image is not None and im.image_size(im.first(mask_image)) != im.image_size(im.first(image)):
            raise ValueError(f"mask size {im.image_size(im.first(mask_image))} differs from image size "
                             f"{im.image_size(im.first(image))}")
        if padding_mask_crop is not None and (mask_image is None or not hasattr(mask_image, "convert")):
            raise ValueError("padding_mask_crop needs a single PIL mask_image")
        if output_type not in ("pil", "np", "latent", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if true_cfg_scale < 0:
            raise ValueError(f"true_cfg_scale must be >= 0, got {true_cfg_scale}")

    def _encode(self, prompt, prompt_2, embeds, pooled, n: int, max_sequence_length: int) -> tuple[Tensor, Tensor]:
        if embeds is None:
            embeds, pooled = self.text_encoders.encode(prompt, prompt_2, n, max_sequence_length)
        elif pooled is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")
        else:
            embeds, pooled = embeds.repeat_interleave(n, 0), pooled.repeat_interleave(n, 0)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    def _encode_image(self, pixels: Tensor, generator: Generators, batch: int) -> Tensor:
        pixels = pixels.to(self.autoencoder.encoder.conv_in.weight.dtype)
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, list):  # one generator per source image, as the reference does
            z = torch.cat([self.autoencoder.encode(pixels[i:i + 1]).sample(generator[i])
                           for i in range(pixels.shape[0])])
        else:
            z = self.autoencoder.encode(pixels).sample(generator)
        z = self.autoencoder.scale_latents(z).to(self.dtype)
        if batch % z.shape[0]:
            raise ValueError(f"{z.shape[0]} source images cannot be spread over {batch} images")
        return torch.cat([z] * (batch // z.shape[0]))

    def _decode(self, x: Tensor, latent_h: int, latent_w: int, width: int, height: int, output_type: str,
                image, mask_image, crop_box) -> list | np.ndarray | Tensor:
        z = self.autoencoder.unscale_latents(unpack_latents(x, latent_h, latent_w))
        decoded = self.autoencoder.decode(z.to(self.autoencoder.decoder.conv_in.weight.dtype))
        pixels = im.postprocess(decoded)
        gen_h, gen_w = pixels.shape[1:3]
        if (gen_h, gen_w) != (height, width):  # generated at the next multiple of 16: centre-crop to the ask
            top, left = (gen_h - height) // 2, (gen_w - width) // 2
            pixels = pixels[:, top:top + height, left:left + width]
        if output_type == "np":
            return pixels
        if output_type == "pt":
            return torch.from_numpy(pixels).permute(0, 3, 1, 2)
        out = im.to_pil(pixels)
        if crop_box is not None:
            out = [im.paste_back(o, image, mask_image, crop_box) for o in out]
        return out


# ----------------------------------------------------------------------------------------------------------------
# loading

def hf_cache_dirs() -> list[Path]:
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [home / "hub"]


def resolve_source(source: str | os.PathLike) -> Path:
    """A local folder or file, the embedded model's name, or a Hugging Face repo id found in the local cache."""
    path = Path(source)
    if path.exists():
        return path
    from .models import model_path  # the embedded models

    embedded = model_path(str(source))
    if embedded is not None:
        return embedded
    if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
        looked = []
        for cache in hf_cache_dirs():
            snapshots = cache / f"models--{source.replace('/', '--')}" / "snapshots"
            looked.append(str(snapshots))
            found = sorted(snapshots.glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1].parent
        raise CheckpointError(f"model {source!r} is not in the local Hugging Face cache (looked in "
                              f"{', '.join(looked)}); download it there or pass a local folder")
    raise CheckpointError(f"no model at {source}: pass a diffusers folder, a BFL .safetensors file, "
                          "a Hugging Face repo id in the local cache, or 'shapes'")


def read_defaults(folder: Path | None, transformer: Flux, vae_scale_factor: int) -> Defaults:
    d = Defaults()
    if not transformer.config.guidance_embed:  # schnell-like: few steps, no guidance, shorter T5 context
        d.steps, d.guidance, d.max_sequence_length = 4, 0.0, 256
    d.width = d.height = 128 * vae_scale_factor  # diffusers' default_sample_size
    if folder is not None and (folder / "rectiflux.json").exists():
        for key, value in read_json(folder / "rectiflux.json").items():
            if hasattr(d, key) and key != "extra":
                setattr(d, key, type(getattr(d, key))(value))
            else:
                d.extra[key] = value
    return d


def load(source: str | os.PathLike = "shapes", dtype: torch.dtype | str | None = torch.float32,
         device: str | torch.device = "cpu", vae: str | os.PathLike | None = None,
         text_encoders: str | os.PathLike | None = None, quantize: str | None = None,
         blocks: str = "lazy") -> FluxPipeline:
    """Load a whole pipeline.

    `source` is a diffusers-layout folder, a BFL transformer .safetensors file (with `vae=` the BFL ae.safetensors
    and `text_encoders=` a diffusers folder holding the CLIP and T5 subfolders, both found beside the file when
    not given), a Hugging Face repo id in the local cache, or the name of an embedded model ('shapes').
    `quantize` ("int8", "int8-dynamic" for int8 activations too, or "float8") stores the transformer blocks'
    linear layers in 8 bits with per-channel scales, each block as it is read.
    `blocks` says when the transformer's blocks are read from disk: "lazy" (at first use: loading takes the
    time to read the headers), "memory" (now) or "stream" (before every use and freed after it: peak memory
    is about one block, for machines that cannot hold the model; slower, since every step reads the file).
    """
    dtype = parse_dtype(dtype)
    prepare = None
    if quantize is not None:
        from .quantize import block_quantizer

        modes = {"int8": ("int8", None), "int8-dynamic": ("int8", "int8"), "float8": ("float8", None)}
        if quantize not in modes:
            raise ValueError(f"quantize must be one of {', '.join(modes)}, got {quantize!r}")
        if blocks == "stream":
            raise ValueError("quantize with blocks='stream' would quantise every block at every step; convert the "
                             "checkpoint once with rectiflux.quantize.quantize_file and stream that")
        prepare = block_quantizer(*modes[quantize])
    path = resolve_source(source)
    if path.is_file():  # a BFL single file
        transformer = load_transformer(path, dtype=dtype, blocks=blocks, prepare=prepare)
        vae_path = Path(vae) if vae else path.parent / "ae.safetensors"
        autoencoder = load_autoencoder(vae_path, dtype=dtype)
        encoders_dir = Path(text_encoders) if text_encoders else path.parent
        scheduler = SchedulerConfig(shift=3.0 if transformer.config.guidance_embed else 1.0,
                                    use_dynamic_shifting=transformer.config.guidance_embed)
        folder = None
    else:
        if not (path / "transformer").is_dir():
            raise CheckpointError(f"{path} is not a diffusers FLUX folder (no transformer/ subfolder)")
        transformer = load_transformer(path / "transformer", dtype=dtype, blocks=blocks, prepare=prepare)
        autoencoder = load_autoencoder(Path(vae) if vae else path / "vae", dtype=dtype)
        encoders_dir = Path(text_encoders) if text_encoders else path
        sched_file = path / "scheduler" / "scheduler_config.json"
        scheduler = SchedulerConfig.from_diffusers(read_json(sched_file)) if sched_file.exists() else SchedulerConfig()
        folder = path
    encoders = TextEncoders.from_folder(encoders_dir, dtype=dtype)
    pipe = FluxPipeline(transformer.to(device), autoencoder.to(device), encoders, scheduler, name=path.name)
    pipe.text_encoders.clip.to(device)
    pipe.text_encoders.t5.to(device)
    pipe.defaults = read_defaults(folder, transformer, pipe.vae_scale_factor)
    pipe.source = path
    return pipe

