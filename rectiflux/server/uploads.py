"""Images that clients send: decoded with guards (bytes and pixels checked before any pixel is decoded), stored as
PNG under a name the server makes from their content. No name or path a client sends reaches the file system."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image

from ..files import atomic_write

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")


class UploadError(ValueError):
    """An upload that cannot be used; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """The image in `data`, loaded; 413 beyond `max_pixels`, 400 for anything that is not a whole image."""
    if not data:
        raise UploadError(f"the {what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
            if image.format not in FORMATS:
                raise UploadError(f"the {what} is {image.format}; send PNG, JPEG, WebP, BMP, GIF or TIFF")
            width, height = image.size
            if width * height > max_pixels:
                raise UploadError(f"the {what} is {width}x{height}, more than the {max_pixels} pixels this server "
                                  "takes", status=413)
            image.load()
    except UploadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # PIL's own check, in Image.open
        width, height = _header_size(data)
        raise UploadError(f"the {what} is {width}x{height}, more than the {max_pixels} pixels this server takes",
                          status=413) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UploadError(f"cannot read the {what}: {' '.join(str(e).split()) or type(e).__name__}") from None
    return image


def _header_size(data: bytes) -> tuple[int, int]:
    """The size an image's header claims, read past PIL's bomb check (nothing is decoded)."""
    bound = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    finally:
        Image.MAX_IMAGE_PIXELS = bound


def store_image(image: Image.Image, folder: Path) -> str:
    """Write `image` as PNG named by the sha256 of that PNG (the same image is stored once); returns the name."""
    if image.mode not in PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    name = f"{hashlib.sha256(data).hexdigest()}.png"
    path = folder / name
    if not path.exists():
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)
    return name


def openai_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (transparent where to repaint) as ours (white where to repaint)."""
    if "A" not in mask.getbands() and not (mask.mode == "P" and "transparency" in mask.info):
        raise UploadError("the mask must be a PNG with an alpha channel: its fully transparent pixels are repainted")
    if mask.size != size:
        raise UploadError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}")
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)
