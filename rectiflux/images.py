"""Pixels in and out of the pipeline: PIL/numpy to [-1, 1] tensors, masks, crop boxes, and the paste back.

Resizing follows the reference pipelines (Lanczos, the same "fill" and "crop" fits) so that the same source
image gives the same latents as diffusers.
"""

from __future__ import annotations

import math
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


def to_8bit(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """16-bit and float images scaled to 8 bits (Pillow's own conversions clip them: a 16-bit mid-grey would become
    white). PIL modes I;16*, I and F and uint16 arrays are read as 16-bit (0..65535) unless their values fit 8 bits;
    F images and float arrays whose values lie in [0, 1] are read as [0, 1]. Other images are returned as they are.
    """
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16 or (image.dtype.kind in "iu" and image.dtype != np.uint8):
            top = 65535.0 if image.max(initial=0) > 255 else 255.0
            return np.round(image.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8)
        return image
    if not isinstance(image, Image.Image) or not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = values.max(initial=0)
    if image.mode == "F" and peak <= 1.0:
        top = 1.0
    elif image.mode.startswith("I;16") or peak > 255:
        top = 65535.0
    else:
        top = 255.0
    return Image.fromarray(np.round(values * (255.0 / top)).clip(0, 255).astype(np.uint8), mode="L")


def _to_pil_list(images) -> list:
    images = images if isinstance(images, list) else [images]
    return [to_8bit(open_image(im)) for im in images]


def mask_values(mask: Image.Image) -> Image.Image:
    """A mask image as 8-bit grey, white = repaint. Where the mask has an alpha channel, transparent pixels count as
    black (keep): a mask painted on a transparent layer means only what was painted."""
    mask = to_8bit(mask)
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        grey = np.asarray(rgba.convert("L"), dtype=np.float64) * np.asarray(rgba.getchannel("A"), np.float64)
        return Image.fromarray(np.round(grey / 255.0).astype(np.uint8), mode="L")
    return mask.convert("L")


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
            m = mask_values(m)
            if crop is not None:
                m = m.crop(crop)
            m = fit_fill(m, width, height) if fill else m.resize((width, height), resample=Image.LANCZOS)
            m = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
        out.append(m)
    mask = torch.from_numpy(np.stack(out))[:, None]
    return (mask >= 0.5).float()


def mask_crop_box(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """The box (x1, y1, x2, y2) around the white part of `mask`, padded, widened to the aspect ratio width/height."""
    m = np.asarray(mask_values(mask))
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
    original = to_8bit(original)
    width, height = original.size
    keep = Image.new("RGBa", (width, height))
    keep.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_values(mask)))
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


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of two images whose values span `data_range` (1 for [0, 1], 2 for [-1, 1]);
    inf for identical images."""
    a = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    b = b.detach().double().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def mask_is_empty(masks) -> bool:
    """Whether no pixel of the mask(s) would be repainted (all below mid-grey once transparency counts as black)."""
    for m in masks if isinstance(masks, list) else [masks]:
        if isinstance(m, torch.Tensor):
            values = m.float()
            if bool((values >= 0.5).any()):
                return False
            continue
        if isinstance(m, np.ndarray):
            m = Image.fromarray(m if m.dtype == np.uint8 else (np.clip(m, 0, 1) * 255).round().astype(np.uint8))
        if np.asarray(mask_values(m)).max(initial=0) >= 128:
            return False
    return True


def as_output(images, width: int, height: int, output_type: str, count: int):
    """The source image(s) themselves as a pipeline's output: `count` images of width x height (resized only if
    their size differs), as PIL images, a numpy array or a tensor."""
    pixels = (preprocess_image(images, width, height) + 1) / 2
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    if count % pixels.shape[0]:
        raise ValueError(f"{pixels.shape[0]} images cannot be spread over {count} outputs")
    pixels = np.concatenate([pixels] * (count // pixels.shape[0]))
    if output_type == "np":
        return pixels
    if output_type == "pt":
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return to_pil(pixels)


def canny(image: ImageInput, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """An edge map of `image` (white edges on black, RGB) for FLUX.1-Canny, by OpenCV's Canny detector (the
    optional extra: pip install 'rectiflux[control]')."""
    try:
        import cv2
    except ImportError:
        raise ImportError("rectiflux.images.canny needs OpenCV: pip install 'rectiflux[control]' "
                          "(opencv-python-headless)") from None
    grey = np.asarray(to_8bit(open_image(image)).convert("L") if not isinstance(image, np.ndarray)
                      else Image.fromarray(to_8bit(image)).convert("L"))
    edges = cv2.Canny(grey, low_threshold, high_threshold)
    return Image.fromarray(edges, mode="L").convert("RGB")
