"""FLUX.1-Kontext: editing an image from an instruction. The transformer is FLUX.1-dev's; the reference image's
latents (its posterior mean) are appended to the generated tokens with RoPE ids whose first coordinate is 1, and the
prediction for them is dropped at every step.

The reference is resized as diffusers' FluxKontextPipeline does: to the preferred Kontext resolution of the nearest
aspect ratio (with `_auto_resize`, the default), each side floored to a multiple of 16 (2 x the autoencoder's
downscale). Where we differ: the output takes the reference's resized size unless a size is given, as the BFL
reference does (diffusers makes 1024x1024 by default), scaled down to `max_area` if larger; a size given is kept.
"""

from __future__ import annotations

import torch
from PIL import Image

from .. import images as im
from ..sampling.latents import latent_image_ids, pack_latents
from .task import Call, Geometry, Prepared, given_latents, noise, refuse
from .task import finish as finish  # this task decodes as the others do

# (width, height) of the images Kontext was trained on
PREFERRED_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


def reference_size(width: int, height: int, multiple: int, auto_resize: bool) -> tuple[int, int]:
    """The (width, height) a reference image of this size is resized to."""
    width, height = width - width % multiple, height - height % multiple
    if auto_resize:
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_RESOLUTIONS)
    return width // multiple * multiple, height // multiple * multiple


def capped(width: int, height: int, max_area: int, multiple: int) -> tuple[int, int]:
    """(width, height) scaled down to `max_area` pixels at the same aspect ratio (diffusers' formula)."""
    if width * height <= max_area:
        return width, height
    aspect = width / height
    width, height = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return width // multiple * multiple, height // multiple * multiple


def output_size(pipe, image, max_area: int = 1024 ** 2, auto_resize: bool = True) -> tuple[int, int]:
    """The (width, height) Kontext makes for reference `image` when no size is given."""
    multiple = 2 * pipe.vae_scale_factor
    ref_w, ref_h = reference_size(*im.image_size(im.first(image)), multiple, auto_resize)
    return capped(ref_w, ref_h, max_area, multiple)


def resolve(pipe, call: Call) -> None:
    call.strength = 1.0
    if call.image is None or (call.width is not None and call.height is not None):
        return
    out_w, out_h = output_size(pipe, call.image, call.max_area, call._auto_resize)
    call.width, call.height = call.width or out_w, call.height or out_h


def check(pipe, call: Call) -> None:
    if call.image is None:
        raise ValueError(f"{pipe.name} is a Kontext model: give the image to edit (image=, --image)")
    refuse(call, "Kontext", ("mask_image", "masked_image_latents", "control_image", "padding_mask_crop"))
    if not isinstance(call.max_area, int) or call.max_area < 256:
        raise ValueError(f"max_area must be a whole number of pixels of at least 256, got {call.max_area!r}")
    w, h = im.image_size(im.first(call.image))
    multiple = 2 * pipe.vae_scale_factor
    if w < multiple or h < multiple:
        raise ValueError(f"the reference image is {w}x{h}; Kontext needs at least {multiple}x{multiple}")


def geometry(pipe, call: Call) -> Geometry:
    return Geometry.rounded_up(call.width, call.height, pipe.vae_scale_factor)


def uses_strength(call: Call) -> bool:
    return False


def reference_pixels(images, multiple: int, auto_resize: bool) -> torch.Tensor:
    """The reference image(s), resized as Kontext wants them, as (B, 3, H, W) in [-1, 1]."""
    first = im.first(images)
    w, h = reference_size(*im.image_size(first), multiple, auto_resize)
    if isinstance(first, torch.Tensor):
        return im.preprocess_image(images, w, h)
    resized = [im.to_8bit(i).resize((w, h), resample=Image.LANCZOS) if isinstance(i, Image.Image) else i
               for i in (images if isinstance(images, list) else [images])]
    return im.preprocess_image(resized, w, h)


def prepare(pipe, call: Call, g: Geometry, batch: int, sigmas: torch.Tensor) -> Prepared:
    device, dtype = pipe.device, pipe.dtype
    pixels = reference_pixels(call.image, 2 * pipe.vae_scale_factor, call._auto_resize)
    reference = pipe.encode_image(pixels, call.generator, batch, sample=False)  # the mean: no random draw
    ref_h, ref_w = reference.shape[-2:]
    x = given_latents(call, device, dtype)
    if x is None:
        x = pack_latents(noise(pipe, call, g, batch))
    return Prepared(x, sigmas, latent_image_ids(g.latent_h, g.latent_w, device, dtype),
                    img_cond_seq=pack_latents(reference),
                    img_cond_seq_ids=latent_image_ids(ref_h, ref_w, device, dtype, index=1))

