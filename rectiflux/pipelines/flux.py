"""FluxPipeline: one object for every FLUX.1 variant, called with diffusers' arguments.

A call resolves its arguments (the model's defaults, every check before any model runs), encodes the prompt, lets
the module of the pipeline's task prepare the first latents and the image conditioning (`text_to_image` for
text-to-image, img2img and inpainting; `fill`; `control`; `kontext`), runs the one denoising loop
(`rectiflux.sampling.denoise`) and decodes. Random numbers are drawn in the reference's order and shapes, so a seed
gives the same image here as in diffusers.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import images as im
from .. import runtime
from ..flux.autoencoder import AutoEncoder
from ..flux.layers import ATTENTIONS
from ..flux.text_encoders import MAX_T5_LENGTH, TextEncoders
from ..flux.transformer import Flux
from ..progress import progress_bar
from ..sampling.denoise import Conditioning, denoise
from ..sampling.latents import Generators, text_ids, unpack_latents
from ..sampling.schedule import SchedulerConfig, get_sigmas, strength_start
from . import control, fill, kontext, text_to_image
from .task import Call, Geometry, Prepared

MAX_SIDE = 8192
KINDS = ("flux", "fill", "control", "kontext")
TASKS = {"flux": text_to_image, "fill": fill, "control": control, "kontext": kontext}
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")


class ModelRangeWarning(UserWarning):
    """A size or a word the model was not trained on (from the facts in its rectiflux.json): it will likely fail."""


@dataclass
class PipelineOutput:
    images: list | np.ndarray | Tensor
    steps: int = 0  # the denoising steps that ran
    cached_steps: int = 0  # steps whose later transformer blocks the step cache skipped


@dataclass
class Defaults:
    """Per-model defaults and facts, read from the model folder (`rectiflux.json`) or guessed from the model kind."""

    steps: int = 28
    guidance: float = 3.5
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = 512
    strength: float = 0.6
    # what the model was trained on, when that is known and narrow (the embedded shapes model): used only to warn
    known_sizes: tuple[tuple[int, int], ...] | None = None
    known_words: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.known_sizes is not None:
            self.known_sizes = tuple(tuple(int(v) for v in size) for size in self.known_sizes)
        if self.known_words is not None:
            self.known_words = frozenset(str(w).lower() for w in self.known_words)


@dataclass
class _Offload:
    mode: str  # "model" or "sequential"
    device: torch.device


def _finite(name: str, value: Any) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")


def check_text(name: str, text: str | list[str] | None) -> None:
    """Refuse text that is not valid Unicode (lone surrogates: what undecodable bytes on a command line become)."""
    for i, t in enumerate([text] if isinstance(text, str) else text or []):
        if not isinstance(t, str):
            raise ValueError(f"{name} must be text, got {type(t).__name__}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            where = name if isinstance(text, str) else f"{name} {i}"
            raise ValueError(f"{where} is not valid text (an undecodable character at position {e.start}); "
                             "pass it as UTF-8") from None


class FluxPipeline:
    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, text_encoders: TextEncoders | None,
                 scheduler: SchedulerConfig, defaults: Defaults | None = None, name: str = "flux",
                 kind: str = "flux"):
        if kind not in KINDS:
            raise ValueError(f"unknown pipeline kind {kind!r}; use one of {', '.join(KINDS)}")
        self.transformer, self.autoencoder, self.text_encoders = transformer, autoencoder, text_encoders
        self.scheduler, self.name, self.kind = scheduler, name, kind
        self.defaults = defaults or Defaults()
        self.source: Path | None = None
        self._progress_bar_config: dict[str, Any] = {}
        self._interrupt = False
        self._offload: _Offload | None = None
        self._lora = None
        self._warned: set[str] = set()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, torch_dtype: torch.dtype | str | None = None,
                        **kwargs: Any) -> FluxPipeline:
        """diffusers' name for `rectiflux.load`: a folder, a BFL file, a repo id in the local HF cache or 'shapes'.

        diffusers' loading options that do not apply here (`local_files_only`, `use_safetensors`, `variant`,
        `low_cpu_mem_usage`) are accepted and ignored: rectiflux reads only local safetensors files anyway."""
        from .load import load

        for ignored in ("local_files_only", "use_safetensors", "low_cpu_mem_usage", "variant", "revision"):
            kwargs.pop(ignored, None)
        if torch_dtype is None and "dtype" not in kwargs:
            torch_dtype = torch.float32
        return load(pretrained_model_name_or_path, dtype=kwargs.pop("dtype", torch_dtype), **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # diffusers' names for the parts

    @property
    def vae(self) -> AutoEncoder:
        return self.autoencoder

    @property
    def text_encoder(self):
        return None if self.text_encoders is None else self.text_encoders.clip

    @property
    def text_encoder_2(self):
        return None if self.text_encoders is None else self.text_encoders.t5

    @property
    def tokenizer(self):
        return None if self.text_encoders is None else self.text_encoders.clip_tokenizer

    @property
    def tokenizer_2(self):
        return None if self.text_encoders is None else self.text_encoders.t5_tokenizer

    @property
    def components(self) -> dict[str, Any]:
        # image_encoder and feature_extractor are diffusers' IP-Adapter slots, empty there too
        return {"scheduler": self.scheduler, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2,
                "tokenizer": self.tokenizer, "tokenizer_2": self.tokenizer_2, "transformer": self.transformer,
                "vae": self.vae, "image_encoder": None, "feature_extractor": None}

    @property
    def vae_scale_factor(self) -> int:
        return self.autoencoder.config.downscale

    @property
    def device(self) -> torch.device:
        """Where the models run (with CPU offload: the device they are moved to while they run)."""
        return self._offload.device if self._offload is not None else self.transformer.device

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each model computes in (they differ after `load(dtype="auto")`)."""
        return {"transformer": self.transformer.dtype,
                "vae": self.autoencoder.decoder.conv_in.weight.dtype,
                "text_encoders": self.text_encoders.t5.dtype}

    @property
    def kernels(self) -> dict[str, str]:
        """The kernel choices that change pixels and that this machine's timings make (`load(kernels=...)` fixes
        them): the transformer's attention and, with int8-dynamic, how its int8 products run (known once its
        blocks are read: with blocks="lazy", after the first generation)."""
        from ..quantize.linear import int8_products

        attention = getattr(self.transformer, "attention", None)
        names = [name for name, function in ATTENTIONS.items() if attention is function]
        kernels = {"attention": names[0]} if names else {}  # none for a function set by hand
        if (products := int8_products(self.transformer)) is not None:
            kernels["int8_products"] = products
        return kernels

    @property
    def interrupt(self) -> bool:
        """Set it (or `_interrupt`, as diffusers' callbacks do) during a call: the remaining steps are skipped."""
        return self._interrupt

    @interrupt.setter
    def interrupt(self, value: bool) -> None:
        self._interrupt = bool(value)

    def to(self, *args: Any, **kwargs: Any) -> FluxPipeline:
        """`pipe.to(device)`, `pipe.to(dtype)`, `pipe.to(device, dtype)` (also as `torch_device=`/`torch_dtype=`)."""
        device, dtype = kwargs.pop("torch_device", kwargs.pop("device", None)), kwargs.pop("torch_dtype",
                                                                                           kwargs.pop("dtype", None))
        if kwargs:
            raise TypeError(f"to() got unexpected arguments {', '.join(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype) or (isinstance(arg, str) and arg in _DTYPE_NAMES):
                dtype = arg
            else:
                device = arg
        from ..weights.checkpoint import parse_dtype

        dtype = parse_dtype(dtype)
        device = check_device(device) if device is not None else None
        for model in (self.transformer, self.autoencoder):
            cast(model, device, dtype)
        if self.text_encoders is not None:
            self.text_encoders.to(device, dtype)
        return self

    # ------------------------------------------------------------------------------------------------------------
    # memory helpers, as diffusers names them

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Keep every model in CPU memory and move each to `device` only while it runs."""
        self._enable_offload("model", gpu_id, device)

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Like model offload, and the transformer's blocks go to `device` one at a time, each only while it runs (a
        transformer loaded with blocks="stream" already reads each block from disk onto the device and frees it)."""
        self._enable_offload("sequential", gpu_id, device)

    def _enable_offload(self, mode: str, gpu_id: int | None, device: torch.device | str) -> None:
        device = torch.device(device)
        if device.type == "cuda" and gpu_id is not None:
            device = torch.device("cuda", gpu_id)
        if device.type == "cuda" and not torch.cuda.is_available():
            warnings.warn(f"enable_{mode}_cpu_offload: no CUDA device here, so the models stay where they are",
                          stacklevel=3)
            return
        check_device(device)
        from ..weights.offload import DeviceOffload

        self.to("cpu")
        if mode == "sequential":
            weights = self.transformer.block_weights
            if weights is None or getattr(weights, "mode", None) != "stream":
                self.transformer.materialize()
                blocks = [n for n, _ in self.transformer.units() if n.startswith(("double_blocks.", "single_blocks."))]
                self.transformer.block_weights = DeviceOffload(device, blocks)
        self._offload = _Offload(mode, device)

    @contextmanager
    def _on_device(self, model: torch.nn.Module | TextEncoders):
        """Around one model's use: with CPU offload, the model is on the execution device only meanwhile."""
        if self._offload is None:
            yield
            return
        if isinstance(model, Flux):
            cast(model, self._offload.device, None)
        else:
            model.to(self._offload.device)
        try:
            yield
        finally:
            if isinstance(model, Flux):
                cast(model, torch.device("cpu"), None)
            else:
                model.to("cpu")

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (less memory, the same pixels): `pipe.vae.enable_slicing()`."""
        self.autoencoder.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.autoencoder.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode and decode large images in overlapping tiles blended at the seams, so memory stays bounded:
        `pipe.vae.enable_tiling()`. Tiles are `pipe.vae.tile_sample_min_size` pixels (the autoencoder's
        `sample_size`, 1024 for FLUX's, as in diffusers) with 25% overlap; smaller images are coded whole."""
        self.autoencoder.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.autoencoder.disable_tiling()

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Accepted for diffusers scripts and does nothing: attention runs in SDPA's fused kernels, which never hold
        the whole attention matrix, so there is nothing to slice."""

    def disable_attention_slicing(self) -> None:
        """See enable_attention_slicing."""

    # ------------------------------------------------------------------------------------------------------------
    # several processes for one image (rectiflux.parallel)

    def enable_sequence_parallel(self, group: Any = None, backend: str = "ulysses") -> None:
        """Split the transformer's tokens over the processes of `group` (a ProcessGroup or a 1-D DeviceMesh; None:
        the default group, which torch.distributed must have initialised): sequence parallelism, its attention
        done by `backend`, "ulysses" (all-to-alls; a head count the group's size does not divide is refused) or
        "ring" (ring attention, any head count). Every process makes the same call and gets the same images;
        without a seed or generator the first process draws the seed for all of them."""
        from ..parallel import sequence_parallel

        sequence_parallel(self.transformer, group, backend)

    def disable_sequence_parallel(self) -> None:
        """Run the whole transformer in this process again."""
        from ..parallel import remove_sequence_parallel

        remove_sequence_parallel(self.transformer)

    def _parallel_group(self):
        """The process group the transformer splits its tokens over, or None (rectiflux.parallel is imported only
        when something turned it on)."""
        sequence = sys.modules.get("rectiflux.parallel.sequence")
        return None if sequence is None else sequence.sequence_parallel_group(self.transformer)

    # ------------------------------------------------------------------------------------------------------------
    # LoRA, with diffusers' FluxLoraLoaderMixin names (rectiflux.lora)

    @property
    def lora(self):
        if self._lora is None:
            from ..lora.adapters import Adapters

            self._lora = Adapters(self)
        return self._lora

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          weight_name: str | None = None, **kwargs: Any) -> None:
        """Load a LoRA (a .safetensors file, a folder holding pytorch_lora_weights.safetensors or `weight_name`, or a
        state dict) in any of the formats rectiflux.lora.formats reads; it becomes the active adapter. A file that
        does not fit this pipeline is refused whole and leaves the pipeline as it was."""
        for ignored in ("low_cpu_mem_usage", "hotswap", "local_files_only"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"load_lora_weights() got unexpected arguments {', '.join(kwargs)}")
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, str) and not Path(source).exists() and source.count("/") == 1:
            from ..weights.sources import resolve_source

            source = resolve_source(source)
        self.lora.load(source, adapter_name, weight_name)

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None) -> None:
        """Make these adapters the active ones, with these weights (1 each by default)."""
        self.lora.set(adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        return list(self.lora.active) if self._lora is not None else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"transformer": list(self.lora.loaded)} if self._lora is not None and self.lora.loaded else {}

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        self.lora.delete(adapter_names)

    def unload_lora_weights(self, reset_to_overwritten_params: bool = True) -> None:
        """Remove every adapter and put the model back as it was loaded (a control LoRA's widening included)."""
        if self._lora is not None:
            self.lora.unload()

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Merge the active (or named) adapters into the weights, in float32, rounded once into their dtype; 8-bit
        weights are re-quantised from the float checkpoint. Steps then cost what they cost without LoRA."""
        self.lora.fuse(lora_scale, adapter_names)

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        """Put back the exact weights the fused modules had (kept copies)."""
        if self._lora is not None:
            self.lora.unfuse()

    # ------------------------------------------------------------------------------------------------------------
    # progress, as diffusers shows it

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options of the denoising bar (tqdm's: `disable`, `desc`, `leave`, `file`, ...). By default it is drawn
        only when stderr is a terminal."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Any = None, total: int | None = None):
        total = len(iterable) if total is None and iterable is not None else total
        bar = progress_bar(total, **self._progress_bar_config)
        if iterable is not None:
            bar.iterable = iterable
        return bar

    # ------------------------------------------------------------------------------------------------------------
    # stages shared by every task

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str] | None, prompt_2: str | list[str] | None = None,
                      device: torch.device | str | None = None, num_images_per_prompt: int = 1,
                      prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                      max_sequence_length: int = 512, lora_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(prompt_embeds, pooled_prompt_embeds, text_ids), as diffusers' FluxPipeline.encode_prompt returns them."""
        embeds, pooled = self._encode(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, num_images_per_prompt,
                                      max_sequence_length)
        device = torch.device(device) if device is not None else self.device
        return embeds.to(device), pooled.to(device), text_ids(embeds.shape[1], device, embeds.dtype)

    def _encode(self, prompt, prompt_2, embeds, pooled, n: int, max_sequence_length: int) -> tuple[Tensor, Tensor]:
        if embeds is None:
            if self.text_encoders is None:
                raise ValueError("this pipeline has no text encoders: pass prompt_embeds and pooled_prompt_embeds")
            encoders = self.text_encoders
            prompts = 1 if isinstance(prompt, str) else len(prompt)
            with self._on_device(encoders), runtime.threads_for(encoders.work(prompts, max_sequence_length),
                                                                self.device):
                embeds, pooled = encoders.encode(prompt, prompt_2, n, max_sequence_length)
        elif pooled is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")
        else:
            embeds, pooled = embeds.repeat_interleave(n, 0), pooled.repeat_interleave(n, 0)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_image(self, pixels: Tensor, generator: Generators, batch: int, sample: bool = True) -> Tensor:
        """Images in [-1, 1] -> scaled latents repeated to `batch` rows: a posterior sample drawn with `generator`
        (one generator per image for a list, as the reference does), or its mean with `sample=False`."""
        ae = self.autoencoder
        with self._on_device(ae):
            pixels = pixels.to(self.device, ae.encoder.conv_in.weight.dtype)
            if isinstance(generator, list) and len(generator) == 1:
                generator = generator[0]
            with runtime.threads_for(ae.work(pixels.shape[0], pixels.shape[-2] * pixels.shape[-1]), self.device):
                if isinstance(generator, list):  # image i is drawn with generator i, as the reference does
                    posteriors = [ae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])]
                    z = torch.cat([p.sample(generator[i]) if sample else p.mode() for i, p in enumerate(posteriors)])
                else:
                    posterior = ae.encode(pixels)
                    z = posterior.sample(generator) if sample else posterior.mode()
        z = ae.scale_latents(z).to(self.device, self.dtype)
        if batch % z.shape[0]:
            raise ValueError(f"{z.shape[0]} images cannot be spread over {batch} generated images")
        return torch.cat([z] * (batch // z.shape[0]))

    @torch.no_grad()
    def decode_latents(self, latents: Tensor, geometry: Geometry) -> np.ndarray:
        """Packed latents -> float32 (B, H, W, 3) pixels in [0, 1], cropped to the size asked for."""
        ae = self.autoencoder
        z = ae.unscale_latents(unpack_latents(latents, geometry.latent_h, geometry.latent_w))
        f = self.vae_scale_factor
        with self._on_device(ae), runtime.threads_for(ae.work(1, z.shape[-2] * z.shape[-1] * f * f), self.device):
            decoded = ae.decode(z.to(self.device, ae.decoder.conv_in.weight.dtype))
        pixels = im.postprocess(decoded)
        gen_h, gen_w = pixels.shape[1:3]
        if (gen_h, gen_w) != (geometry.height, geometry.width):  # generated at the next multiple: centre-crop
            top, left = (gen_h - geometry.height) // 2, (gen_w - geometry.width) // 2
            pixels = pixels[:, top:top + geometry.height, left:left + geometry.width]
        return pixels

    # ------------------------------------------------------------------------------------------------------------
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
        masked_image_latents: Tensor | None = None,
        control_image: Any = None,
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
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int | None = None,
        max_area: int = 1024 ** 2,
        _auto_resize: bool = True,
        progress: Callable[[int, int], None] | None = None,
        cache_threshold: float | None = None,
    ) -> PipelineOutput | tuple:
        """Generate images with diffusers' arguments for this pipeline's kind, plus `seed`, `progress(step, total)`
        (told of every step) and `cache_threshold` (opt-in step caching, rectiflux.sampling.cache: 0.1 skips the
        blocks after the first on steps whose first-block output changed by less than 10% since the last full step).

        - text-to-image, img2img (`image`, `strength`) and inpainting (`mask_image`, white = repaint) for FLUX.1-dev
          and schnell; Fill (`image`, `mask_image` or `masked_image_latents`); Control (`control_image`);
          Kontext (`image` is the reference to edit, `max_area`, `_auto_resize`).
        - `return_dict=False` gives a tuple whose first item is the images.
        """
        call = Call(**{k: v for k, v in locals().items() if k in Call.__dataclass_fields__})
        self._interrupt = False
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        scaled = self.lora.scaled(lora_scale) if self._lora is not None else contextlib.nullcontext()
        with runtime.generation(self.device), scaled:
            output = self._generate(call)
        return output if return_dict else (output.images,)

    def _generate(self, call: Call) -> PipelineOutput:
        task = TASKS[self.kind]
        self._resolve(call, task)
        if call.seed is not None and call.generator is None:
            call.generator = torch.Generator("cpu").manual_seed(call.seed)
        group = self._parallel_group()
        if group is not None and call.generator is None and call.latents is None:  # every rank draws the same noise
            from ..parallel import shared_seed

            call.generator = torch.Generator("cpu").manual_seed(shared_seed(group))
        task.check(self, call)
        geometry = task.geometry(self, call)
        self._check_size(geometry)
        self._check(call)
        self._check_generators(call)
        self._check_prompts(call)
        self._warn_outside_training(call, geometry)

        if call.mask_image is not None and call.output_type != "latent" and im.mask_is_empty(call.mask_image):
            warnings.warn("the mask is all black (or transparent): nothing will be repainted, so the source image "
                          "is returned as it is", stacklevel=3)
            return PipelineOutput(images=im.as_output(call.image, geometry.width, geometry.height, call.output_type,
                                                       call.num_images))

        embeds, pooled = self._encode(call.prompt, call.prompt_2, call.prompt_embeds, call.pooled_prompt_embeds,
                                      call.num_images_per_prompt, call.max_sequence_length)
        negative = None
        if call.do_true_cfg:
            negative = self._encode(call.negative_prompt, call.negative_prompt_2, call.negative_prompt_embeds,
                                    call.negative_pooled_prompt_embeds, call.num_images_per_prompt,
                                    call.max_sequence_length)
        batch = embeds.shape[0]
        all_sigmas = get_sigmas(call.num_inference_steps, geometry.image_seq_len, self.scheduler, call.sigmas)
        start = strength_start(call.num_inference_steps, call.strength) if task.uses_strength(call) else 0
        prepared: Prepared = task.prepare(self, call, geometry, batch, all_sigmas[start:])

        guidance = None
        if self.transformer.config.guidance_embed:
            guidance = torch.full([batch], call.guidance_scale, device=self.device, dtype=torch.float32)
        image_slots = {"img_ids": prepared.img_ids, "guidance": guidance, "img_cond": prepared.img_cond,
                       "img_cond_seq": prepared.img_cond_seq, "img_cond_seq_ids": prepared.img_cond_seq_ids}
        cond = Conditioning(embeds, pooled, text_ids(embeds.shape[1], self.device, self.dtype), **image_slots)
        negative_cond = None
        if negative is not None:
            negative_cond = Conditioning(negative[0], negative[1],
                                         text_ids(negative[0].shape[1], self.device, self.dtype), **image_slots)

        on_step = None
        if call.callback_on_step_end is not None:
            names = call.callback_on_step_end_tensor_inputs or ["latents"]

            def on_step(i: int, t: Tensor, x: Tensor, c: Conditioning) -> Tensor:
                values = {"latents": x, "prompt_embeds": c.txt}
                result = call.callback_on_step_end(self, i, t, {k: values[k] for k in names}) or {}
                c.txt = result.get("prompt_embeds", c.txt)
                return result.get("latents", x)

        n_steps = len(all_sigmas) - 1 - start
        bar = self.progress_bar(total=n_steps)

        def told(step: int, total: int) -> None:
            bar.update(1)
            if call.progress is not None:
                call.progress(step, total)

        transformer = self.transformer
        work = transformer.work(batch, prepared.tokens + embeds.shape[1])
        try:
            with self._on_device(transformer), runtime.threads_for(work, self.device):
                done = denoise(transformer, prepared.latents, prepared.sigmas, cond, negative=negative_cond,
                               true_cfg_scale=call.true_cfg_scale, inpainting=prepared.inpainting,
                               cache_threshold=call.cache_threshold,
                               num_train_timesteps=self.scheduler.num_train_timesteps, on_step=on_step,
                               progress=told, stop=lambda: self._interrupt)
        finally:
            bar.close()

        if call.output_type == "latent":
            return PipelineOutput(images=done.latents, steps=done.steps, cached_steps=done.cached_steps)
        pixels = self.decode_latents(done.latents, geometry)
        return PipelineOutput(images=task.finish(self, call, geometry, pixels), steps=done.steps,
                              cached_steps=done.cached_steps)

    # ------------------------------------------------------------------------------------------------------------
    def _resolve(self, call: Call, task) -> None:
        """Fill in the model's defaults and open image paths (so a bad file is reported before any model runs)."""
        d = self.defaults
        if call.num_inference_steps is None:  # like the reference, explicit sigmas set the step count
            call.num_inference_steps = len(call.sigmas) if call.sigmas is not None else d.steps
        if call.guidance_scale is None:
            call.guidance_scale = d.guidance
        if call.max_sequence_length is None:
            call.max_sequence_length = d.max_sequence_length
        for name in ("image", "mask_image", "control_image"):
            setattr(call, name, im.open_images(getattr(call, name)))
        task.resolve(self, call)

    def _check_size(self, geometry: Geometry) -> None:
        for name, side in (("width", geometry.width), ("height", geometry.height)):
            if isinstance(side, bool) or not isinstance(side, int) or not 16 <= side <= MAX_SIDE:
                raise ValueError(f"{name} must be a whole number of pixels from 16 to {MAX_SIDE}, got {side!r}")

    def _check(self, call: Call) -> None:
        if call.prompt is None and call.prompt_embeds is None:
            raise ValueError("give a prompt (or prompt_embeds)")
        if isinstance(call.prompt, list) and not call.prompt:
            raise ValueError("prompt is an empty list: give at least one prompt")
        if call.prompt_embeds is None and self.text_encoders is None:
            raise ValueError("this pipeline has no text encoders: pass prompt_embeds and pooled_prompt_embeds")
        for name in ("guidance_scale", "true_cfg_scale", "strength", "cache_threshold"):
            _finite(name, getattr(call, name))
        if call.sigmas is not None:
            values = np.asarray(call.sigmas, dtype=np.float64).ravel()
            if not np.isfinite(values).all():
                raise ValueError("sigmas must be finite numbers")
        steps = call.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number >= 1, got {steps!r}")
        if not 0 < call.strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {call.strength}")
        if call.output_type not in ("pil", "np", "latent", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {call.output_type!r}")
        n = call.num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a whole number >= 1, got {n!r}")
        if call.true_cfg_scale < 0:
            raise ValueError(f"true_cfg_scale must be >= 0, got {call.true_cfg_scale}")
        if call.cache_threshold is not None and call.cache_threshold < 0:
            raise ValueError(f"cache_threshold must be >= 0, got {call.cache_threshold}")
        unknown = set(call.callback_on_step_end_tensor_inputs or ()) - set(CALLBACK_TENSOR_INPUTS)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs has to be in {list(CALLBACK_TENSOR_INPUTS)}, "
                             f"but found {sorted(unknown)}")
        if call.joint_attention_kwargs is not None:
            extra = set(call.joint_attention_kwargs) - {"scale"}
            if extra:
                raise ValueError(f"joint_attention_kwargs takes only 'scale' (the LoRA scale), got {sorted(extra)}")
            _finite("joint_attention_kwargs['scale']", call.joint_attention_kwargs.get("scale"))
        if call.mask_image is not None and call.image is None:
            raise ValueError("mask_image needs an image to inpaint")
        if call.mask_image is not None and im.image_size(im.first(call.mask_image)) != im.image_size(
                im.first(call.image)):
            raise ValueError(f"mask size {im.image_size(im.first(call.mask_image))} differs from image size "
                             f"{im.image_size(im.first(call.image))}")
        if call.padding_mask_crop is not None and (call.mask_image is None or not hasattr(call.mask_image, "convert")):
            raise ValueError("padding_mask_crop needs a single PIL mask_image")

    def _check_generators(self, call: Call) -> None:
        if isinstance(call.generator, list) and len(call.generator) not in (1, call.num_images):
            raise ValueError(f"got {len(call.generator)} generators for {call.num_images} images")

    def _check_prompts(self, call: Call) -> None:
        """Refuse prompts the text encoders cannot take whole before any model runs."""
        for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
            check_text(name, getattr(call, name))
        if not 1 <= call.max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be between 1 and {MAX_T5_LENGTH}, "
                             f"got {call.max_sequence_length}")
        if self.text_encoders is None:
            return
        if call.prompt_embeds is None:
            self.text_encoders.check(call.prompt, call.prompt_2, call.max_sequence_length)
        if call.do_true_cfg and call.negative_prompt_embeds is None:
            self.text_encoders.check(call.negative_prompt, call.negative_prompt_2, call.max_sequence_length)

    def _warn_outside_training(self, call: Call, geometry: Geometry) -> None:
        """Warn once per size or word that the model's facts say it was never trained on."""
        d = self.defaults
        if d.known_sizes and (geometry.width, geometry.height) not in d.known_sizes:
            key = f"size {geometry.width}x{geometry.height}"
            if key not in self._warned:
                self._warned.add(key)
                known = ", ".join(f"{w}x{h}" for w, h in d.known_sizes)
                warnings.warn(f"{self.name} was trained on {known} images only: at {geometry.width}x{geometry.height} "
                              "it will likely draw repeated tiles or noise", ModelRangeWarning, stacklevel=4)
        if d.known_words and call.prompt is not None:
            prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
            words = {w for p in prompts for w in re.findall(r"[a-z]+", str(p).lower())}
            unknown = sorted(words - d.known_words - self._warned)
            if unknown:
                self._warned.update(unknown)
                warnings.warn(f"{self.name} does not know the word{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(repr(w) for w in unknown)}: it was trained only on its own captions",
                              ModelRangeWarning, stacklevel=4)


_DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_device(device: torch.device | str) -> torch.device:
    """A torch device that exists here, or a one-line ValueError naming the problem."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {str(e).splitlines()[0]}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device (this torch is "
                         f"{torch.__version__}); use 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but MPS is not available")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device {str(device)!r} cannot run a pipeline; use 'cpu' or 'cuda'")
    return device


def cast(model: torch.nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> None:
    """Move `model` and cast its float parameters; 8-bit weights and their scales keep their dtype."""
    from ..quantize.linear import QuantizedLinear

    if device is not None:
        model.to(device)
    if dtype is None:
        return
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        model.to(dtype)
        return
    if getattr(model, "block_weights", None) is not None:
        model.block_weights.dtype = dtype
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point():
                setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad))
        if not isinstance(module, QuantizedLinear):
            for name, b in list(module.named_buffers(recurse=False)):
                if b.is_floating_point():
                    setattr(module, name, b.to(dtype))

