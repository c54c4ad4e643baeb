"""FLUX.1-Fill: inpainting and outpainting by a model that sees the masked image and the mask at every step.

The transformer's input is 64 packed noise channels, then 64 of the masked image's latents, then the pixel mask with
each downscale x downscale block folded into channels and packed 2x2 (256 channels for FLUX's 8x autoencoder): 384 in
all, concatenated on channels at every step. Random numbers as diffusers' FluxFillPipeline draws them: the source
image's posterior sample, the noise, then the masked image's posterior sample.
"""

from __future__ import annotations

import torch

from .. import images as im
from ..sampling.latents import fold_pixels, latent_image_ids, noise_latents, pack_latents
from .task import Call, Geometry, Prepared, given_latents, noise, refuse, size_from
from .task import finish as finish  # this task decodes as the others do


def resolve(pipe, call: Call) -> None:
    if call.strength is None:
        call.strength = 1.0  # diffusers' default for Fill: the masked region starts from pure noise
    size_from(call, call.image, (pipe.defaults.width, pipe.defaults.height))


def uses_strength(call: Call) -> bool:
    return call.image is not None


def check(pipe, call: Call) -> None:
    if call.masked_image_latents is None and (call.image is None or call.mask_image is None):
        raise ValueError(f"{pipe.name} is a Fill model: give the image to fill and its mask_image (white = fill), "
                         "or masked_image_latents")
    if call.image is None and call.latents is None and call.strength != 1:
        raise ValueError("strength below 1 needs the image to start from")
    refuse(call, "Fill", ("control_image", "padding_mask_crop"))


def geometry(pipe, call: Call) -> Geometry:
    return Geometry.rounded_up(call.width, call.height, pipe.vae_scale_factor)


def mask_channels(mask: torch.Tensor, downscale: int) -> torch.Tensor:
    """A (B, 1, H, W) pixel mask as the transformer's packed conditioning: (B, L, 4 * downscale^2)."""
    return pack_latents(fold_pixels(mask, downscale))


def prepare(pipe, call: Call, g: Geometry, batch: int, sigmas: torch.Tensor) -> Prepared:
    device, dtype = pipe.device, pipe.dtype
    pixels = im.preprocess_image(call.image, g.gen_width, g.gen_height) if call.image is not None else None
    x = given_latents(call, device, dtype)
    if x is None and pixels is None:  # masked_image_latents alone: from pure noise
        x = pack_latents(noise(pipe, call, g, batch))
    elif x is None:
        source = pipe.encode_image(pixels, call.generator, batch)
        x = pack_latents(noise_latents(source, noise(pipe, call, g, batch), sigmas[0]))
    if call.masked_image_latents is not None:
        cond = call.masked_image_latents.to(device, dtype)
    else:
        mask = im.preprocess_mask(call.mask_image, g.gen_width, g.gen_height)
        masked = pipe.encode_image(pixels * (1 - mask), call.generator, batch)
        if batch % mask.shape[0]:
            raise ValueError(f"{mask.shape[0]} masks cannot be spread over {batch} images")
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1).to(device, dtype)
        cond = torch.cat([pack_latents(masked), mask_channels(mask, g.downscale)], dim=-1)
    expected = pipe.transformer.config.in_channels - x.shape[-1]
    if cond.shape[-1] != expected or cond.shape[:2] != x.shape[:2]:
        raise ValueError(f"the Fill conditioning is {tuple(cond.shape)}; this model takes (batch {x.shape[0]}, "
                         f"{x.shape[1]} tokens, {expected} channels)")
    return Prepared(x, sigmas, latent_image_ids(g.latent_h, g.latent_w, device, dtype), img_cond=cond)

