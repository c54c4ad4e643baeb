"""FLUX.1-Canny and Depth: structure-guided generation from a control image (an edge or depth map).

The control image is encoded by the autoencoder (a posterior sample, drawn before the noise as diffusers'
FluxControlPipeline does), packed, and concatenated to the latents on channels at every step (128 in all). The
control image is used as given: `rectiflux.images.canny` makes an edge map from a photo.
"""

from __future__ import annotations

import torch

from .. import images as im
from ..sampling.latents import latent_image_ids, pack_latents
from .task import Call, Geometry, Prepared, given_latents, noise, refuse, size_from
from .task import finish as finish  # this task decodes as the others do


def resolve(pipe, call: Call) -> None:
    call.strength = 1.0
    size_from(call, call.control_image, (pipe.defaults.width, pipe.defaults.height))


def check(pipe, call: Call) -> None:
    if call.control_image is None:
        raise ValueError(f"{pipe.name} is a Control model: give the control image (control_image=, --control-image)")
    refuse(call, "Control", ("image", "mask_image", "masked_image_latents", "padding_mask_crop"))


def geometry(pipe, call: Call) -> Geometry:
    return Geometry.rounded_up(call.width, call.height, pipe.vae_scale_factor)


def uses_strength(call: Call) -> bool:
    return False


def prepare(pipe, call: Call, g: Geometry, batch: int, sigmas: torch.Tensor) -> Prepared:
    device, dtype = pipe.device, pipe.dtype
    pixels = im.preprocess_image(call.control_image, g.gen_width, g.gen_height)
    # the reference repeats the pixels, not the latents: each image gets its own posterior sample
    if pixels.shape[0] == 1:
        pixels = pixels.repeat_interleave(batch, dim=0)
    elif batch % pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} control images cannot be spread over {batch} images")
    else:
        pixels = pixels.repeat_interleave(batch // pixels.shape[0], dim=0)
    cond = pack_latents(pipe.encode_image(pixels, call.generator, batch))
    x = given_latents(call, device, dtype)
    if x is None:
        x = pack_latents(noise(pipe, call, g, batch))
    return Prepared(x, sigmas, latent_image_ids(g.latent_h, g.latent_w, device, dtype), img_cond=cond)

