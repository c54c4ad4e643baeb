"""Pixels in and out of the pipeline: PIL/numpy to [-1, 1] tensors, masks, crop boxes, and the paste back.

Resizing follows the reference pipelines (Lanczos, the same "fill" and "crop" fits) so that the same source
image gives the same latents as diffusers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def open_image(image: ImageInput, what: str = "image") -> Image.Image | np.ndarray | torch.Tensor:
    """Paths are read whole now, so that a bad file is reported before any model runs."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"no {what} file at {path}")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read {what} {path}: {e}") from None
    return image


def open_images(images):
    """Open paths; keep lists as lists and None as None."""
    if images is None:
        return None
    return [open_image(i) for i in images] if isinstance(images, list) else open_image(images)


def first(images):
    return images[0] if isinstance(images, list) else images


def image_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) of one image."""
    image = open_image(image)
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, torch.Tensor):
        return image.shape[-1], image.shape[-2]
    return image.shape[1], image.shape[0]  # numpy (H, W[, C])


def fit_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fit inside (width, height) keeping the aspect ratio, then extend the edge rows/columns to fill."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill = height // 2 - src_h // 2
        if fill > 0:  # stretch the first and last row over the bands above and below
            out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, fill), box=(0, src_h, width, src_h)), box=(0, fill + src_h))
    elif ratio > src_ratio:
        fill = width // 2 - src_w // 2
        if fill > 0:
            out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((fill, height), box=(src_w, 0, src_w, height)), box=(fill + src_w, 0))
    return out


def fit_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover (width, height) keeping the aspect ratio; centre it, cutting what overflows."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.LANCZOS)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return out


def _to_pil_list(images) -> list:
    images = images if isinstance(images, list) else [images]
    return [open_image(im) for im in images]


def preprocess_image(images, width: int, height: int, crop: tuple[int, int, int, int] | None = None,
                     fill: bool = False) -> torch.Tensor:
    """Images -> float32 (B, 3, height, width) in [-1, 1]. Tensors are (B, 3, H, W) in [-1, 1] (or [0, 1])."""
    images = _to_pil_list(images)
    if isinstance(images[0], torch.Tensor):
        x = torch.cat([im if im.ndim == 4 else im[None] for im in images]).float()
        if x.min() >= 0:  # a tensor with no negative value is taken to be in [0, 1], as the reference does
            x = x * 2 - 1
        if x.shape[-2:] != (height, width):
            x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", antialias=True)
        return x
    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im if im.dtype == np.uint8 else (np.clip(im, 0, 1) * 255).round().astype(np.uint8))
        if crop is not None:
            im = im.crop(crop)
        im = fit_fill(im, width, height) if fill else im.resize((width, height), resample=Image.LANCZOS)
        out.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) * 2.0 - 1.0


def preprocess_mask(masks, width: int, height: int, crop: tuple[int, int, int, int] | None = None,
                    fill: bool = False) -> torch.Tensor:
    """Masks -> float32 (B, 1, height, width) of 0 (keep) and 1 (repaint): grayscale, binarised at 0.5."""
    masks = _to_pil_list(masks)
    out = []
    for m in masks:
        if isinstance(m, torch.Tensor):
            m = m.float().reshape(-1, *m.shape[-2:])[0]
            m = torch.nn.functional.interpolate(m[None, None], size=(height, width))[0, 0].numpy()
        else:
            if isinstance(m, np.ndarray):
                m = Image.fromarray(m if m.dtype == np.uint8 else (np.clip(m, 0, 1) * 255).round().astype(np.uint8))
            if crop is not None:
                m = m.crop(crop)
            m = fit_fill(m, width, height) if fill else m.resize((width, height), resample=Image.LANCZOS)
            m = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
        out.append(m)
    mask = torch.from_numpy(np.stack(out))[:, None]
    return (mask >= 0.5).float()


def mask_crop_box(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around the white part of `mask`, padded, widened to the aspect ratio width/height."""
    m = np.asarray(mask.convert("L"))
    rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    if len(rows) == 0:
        raise ValueError("mask_image is all black: there is nothing to repaint")
    h, w = m.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:  # too wide: grow the height, shifting back inside the image
        grow = int((x2 - x1) / target - (y2 - y1))
        y1, y2 = _grow(y1, y2, grow, h)
    else:
        grow = int((y2 - y1) * target - (x2 - x1))
        x1, x2 = _grow(x1, x2, grow, w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, grow: int, size: int) -> tuple[int, int]:
    a, b = a - grow // 2, b + grow - grow // 2
    if b >= size:
        a, b = a - (b - size), size
    if a < 0:
        a, b = 0, b - a
    return a, min(b, size)


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image,
               box: tuple[int, int, int, int]) -> Image.Image:
    """Put an inpainted crop back into the full original, keeping the original's pixels outside the mask."""
    width, height = original.size
    keep = Image.new("RGBa", (width, height))
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    x1, y1, x2, y2 = box
    canvas = Image.new("RGBA", (width, height))
    canvas.paste(fit_crop(generated, x2 - x1, y2 - y1), (x1, y1))
    out = canvas.convert("RGB").convert("RGBA")
    out.alpha_composite(keep.convert("RGBA"))
    return out.convert("RGB")


def postprocess(decoded: torch.Tensor) -> np.ndarray:
    """Decoder output (B, 3, H, W) in about [-1, 1] -> float32 (B, H, W, 3) in [0, 1]."""
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def to_pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]
