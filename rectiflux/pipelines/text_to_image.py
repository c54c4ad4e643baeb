"""FLUX.1-dev and schnell: text-to-image, img2img (`image`, `strength`) and inpainting (`mask_image`).

The img2img source is encoded (a posterior sample) before the noise is drawn, as the reference does; inpainting
resets the latents outside the mask to the source's after every step (rectiflux.sampling.denoise.Inpainting), and
with `padding_mask_crop` works on the masked region only and pastes the result back into the original.
"""

from __future__ import annotations

import torch

from .. import images as im
from ..sampling.denoise import Inpainting
from ..sampling.latents import latent_image_ids, noise_latents, pack_latents
from .task import Call, Geometry, Prepared, given_latents, noise, refuse, size_from, to_output


def resolve(pipe, call: Call) -> None:
    if call.strength is None:
        call.strength = pipe.defaults.strength if call.image is not None else 1.0
    if call.image is None:
        call.strength = 1.0
    size_from(call, call.image, (pipe.defaults.width, pipe.defaults.height))


def check(pipe, call: Call) -> None:
    refuse(call, "text-to-image (control_image is for a Control model, masked_image_latents for a Fill one)",
           ("control_image", "masked_image_latents"))


def geometry(pipe, call: Call) -> Geometry:
    return Geometry.rounded_up(call.width, call.height, pipe.vae_scale_factor)


def uses_strength(call: Call) -> bool:
    return call.image is not None


def crop_box(call: Call, g: Geometry):
    if call.padding_mask_crop is None:
        return None
    return im.mask_crop_box(call.mask_image, g.gen_width, g.gen_height, call.padding_mask_crop)


def prepare(pipe, call: Call, g: Geometry, batch: int, sigmas: torch.Tensor) -> Prepared:
    device, dtype = pipe.device, pipe.dtype
    box = crop_box(call, g)
    source = drawn = None
    if call.image is not None:
        pixels = im.preprocess_image(call.image, g.gen_width, g.gen_height, box, fill=box is not None)
        source = pipe.encode_image(pixels, call.generator, batch)
    x = given_latents(call, device, dtype)
    if x is None:
        drawn = noise(pipe, call, g, batch)
        x = pack_latents(drawn if source is None else noise_latents(source, drawn, sigmas[0]))
    inpainting = None
    if call.mask_image is not None:
        m = im.preprocess_mask(call.mask_image, g.gen_width, g.gen_height, box, fill=box is not None)
        m = torch.nn.functional.interpolate(m, size=(g.latent_h, g.latent_w)).to(device, dtype)
        if batch % m.shape[0]:
            raise ValueError(f"{m.shape[0]} masks cannot be spread over {batch} images")
        mask = pack_latents(m.repeat(batch // m.shape[0], source.shape[1], 1, 1))
        inpainting = Inpainting(mask, pack_latents(source), pack_latents(drawn) if drawn is not None else x)
    return Prepared(x, sigmas, latent_image_ids(g.latent_h, g.latent_w, device, dtype), inpainting=inpainting)


def finish(pipe, call: Call, g: Geometry, pixels):
    box = crop_box(call, g)
    if box is None or call.output_type != "pil":
        return to_output(pixels, call.output_type)
    return [im.paste_back(o, call.image, call.mask_image, box) for o in im.to_pil(pixels)]
