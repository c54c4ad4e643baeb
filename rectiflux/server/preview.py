"""Live previews: latents mapped to RGB by a fixed linear projection, as ComfyUI's latent previews are, instead of
running the decoder every step.

The projection is fitted once per model through its own encoder: a few small images of flat colours are encoded
and a least squares fit maps each latent (its channels and a constant) to the mean colour of the pixels it covers.
A preview needs the colours and the layout, which the latents' grid already has.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import Tensor

from ..sampling.latents import unpack_latents

TILES = 64  # images the projection is fitted on
SIDE = 64  # pixels per side of each


def fit_images(seed: int = 0) -> np.ndarray:
    """(TILES, SIDE, SIDE, 3) float images in [0, 1]: a flat background (black, gray or white for half of them)
    with one rectangle of another colour, so that edges and both colours of a pair are seen."""
    rng = np.random.default_rng(seed)
    images = np.empty((TILES, SIDE, SIDE, 3), np.float32)
    for k in range(TILES):
        background, foreground = rng.random(3), rng.random(3)
        if k % 2 == 0:
            background = np.full(3, rng.choice([0.0, 0.5, 1.0]))
        images[k] = background
        top, bottom = sorted(rng.integers(0, SIDE, 2))
        left, right = sorted(rng.integers(0, SIDE, 2))
        images[k, top:bottom + 8, left:right + 8] = foreground
    return images


def fit_projection(pipe, seed: int = 0) -> Tensor:
    """(C + 1, 3) weights taking a scaled latent (and 1) to the mean RGB, in [0, 1], of the pixels it covers, fitted
    by least squares on `fit_images` encoded by `pipe`'s autoencoder."""
    images = fit_images(seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1
    z = torch.cat([pipe.encode_image(pixels[i:i + 16], None, len(pixels[i:i + 16]), sample=False).float().cpu()
                   for i in range(0, TILES, 16)])  # (TILES, C, h, w)
    factor = SIDE // z.shape[-1]
    target = torch.from_numpy(images).reshape(TILES, z.shape[-2], factor, z.shape[-1], factor, 3).mean((2, 4))
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.reshape(-1, 3)
    # a little ridge keeps channels that these images leave unused from getting huge weights
    return torch.linalg.solve(x.T @ x + 1e-3 * torch.eye(x.shape[1]), x.T @ y)


def latents_to_rgb(latents: Tensor, projection: Tensor) -> np.ndarray:
    """(C, h, w) scaled latents -> (h, w, 3) uint8 through the projection."""
    z = latents.float().cpu()
    flat = torch.cat([z.reshape(z.shape[0], -1).T, torch.ones(z.shape[1] * z.shape[2], 1)], dim=1)
    rgb = (flat @ projection).clamp(0, 1).reshape(z.shape[1], z.shape[2], 3)
    return (rgb * 255).round().to(torch.uint8).numpy()


def predicted_clean(x: Tensor, x_before: Tensor | None, sigma_before: float | None, sigma: float | None) -> Tensor:
    """The clean latents an Euler run heads for: x - sigma * v, with the velocity v read off the last step
    (x_before at sigma_before to x at sigma). Without a step to read, x itself."""
    if x_before is None or sigma_before is None or sigma is None or sigma_before == sigma:
        return x
    velocity = (x.float() - x_before.float()) / (sigma - sigma_before)
    return x.float() - sigma * velocity


def preview_png(tokens: Tensor, latent_h: int, latent_w: int, projection: Tensor) -> bytes:
    """PNG bytes of the first image of packed latents (B, L, 4C) on a latent_h x latent_w grid."""
    from PIL import Image

    z = unpack_latents(tokens[:1].float(), latent_h, latent_w)[0]
    buffer = io.BytesIO()
    Image.fromarray(latents_to_rgb(z, projection)).save(buffer, format="PNG")
    return buffer.getvalue()
