"""Pixels in: 16-bit and float images scaled to 8 bits as Pillow's conversions would not, and masks with alpha."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rectiflux import images


def png16(values: np.ndarray) -> Image.Image:
    """A 16-bit PNG (grey, RGB or RGBA) written byte by byte, as a scanner or a raw converter makes them."""
    height, width, channels = values.shape
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour = {1: 0, 3: 2, 4: 6}[channels]
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_sixteen_bit_pngs_are_scaled(channels):
    deep = np.full((4, 6, channels), 32896, dtype=np.uint16)  # 128 * 257: mid-grey
    deep[0, 0] = 65535
    image = png16(deep)
    grey = np.asarray(images.to_8bit(image).convert("L"))
    assert grey[0, 0] == 255 and grey[1, 1] == 128  # Pillow's own convert("L") of I;16 gives 255 for both


def test_modes_and_arrays():
    i16 = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).convert("I;16")
    assert np.asarray(images.to_8bit(i16)).tolist() == [[0, 128, 255]]
    as_int = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), mode="I")
    assert np.asarray(images.to_8bit(as_int)).tolist() == [[0, 128, 255]]
    small_int = Image.fromarray(np.array([[0, 128, 255]], dtype=np.int32), mode="I")  # values of 8 bits
    assert np.asarray(images.to_8bit(small_int)).tolist() == [[0, 128, 255]]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(images.to_8bit(unit_float)).tolist() == [[0, 128, 255]]
    assert images.to_8bit(np.array([[0, 32896, 65535]], dtype=np.uint16)).tolist() == [[0, 128, 255]]
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    assert images.to_8bit(rgb) is rgb


def test_sixteen_bit_mid_grey_mask_means_mid_grey():
    ramp = np.linspace(0, 255, 32).round().astype(np.uint8)[None].repeat(8, 0)
    eight = images.preprocess_mask(Image.fromarray(ramp, mode="L"), 32, 8)
    sixteen = images.preprocess_mask(Image.fromarray(ramp.astype(np.uint16) * 257).convert("I;16"), 32, 8)
    assert np.array_equal(eight.numpy(), sixteen.numpy()) and 0 < eight.mean() < 1


def test_mask_alpha_counts_as_keep_and_empty_masks_are_seen():
    white = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    assert images.mask_is_empty(white) and images.mask_is_empty(Image.new("L", (8, 8), 127))
    white.putpixel((3, 3), (255, 255, 255, 255))
    assert not images.mask_is_empty(white)
    assert np.asarray(images.mask_values(white))[3, 3] == 255 and np.asarray(images.mask_values(white))[0, 0] == 0


def test_psnr():
    a = np.zeros((4, 4, 3))
    assert images.psnr(a, a) == float("inf")
    assert abs(images.psnr(a, a + 0.1) - 20.0) < 1e-9
    assert abs(images.psnr(a, a + 0.2, data_range=2.0) - 20.0) < 1e-9
