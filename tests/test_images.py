"""Decoding uploads and files: every failure is an UnsupportedImage with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.errors import ImageTooLarge, UnsupportedImage
from models.images import load_image


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    decoded = load_image(encode(image))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA", "1"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    decoded = load_image(encode(Image.new(mode, (5, 3)), fmt))
    assert decoded.mode == "RGB" and decoded.size == (5, 3)


def test_sixteen_bit_grey_is_rescaled_not_clipped() -> None:
    values = np.full((2, 2), 32768, dtype=np.uint16)  # mid grey in 16 bits
    decoded = load_image(encode(Image.fromarray(values), "TIFF"))
    assert 120 <= decoded.getpixel((0, 0))[0] <= 135


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (6, 2))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    decoded = load_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (2, 6)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"this is not an image", "not an image"),
    ],
)
def test_unreadable_bytes_say_why(data: bytes, words: str) -> None:
    with pytest.raises(UnsupportedImage, match=words):
        load_image(data)


def test_truncated_image_is_rejected() -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(UnsupportedImage, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_too_many_pixels_is_rejected_before_decoding() -> None:
    data = encode(Image.new("L", (300, 300)))
    with pytest.raises(ImageTooLarge, match="90,000 pixels"):
        load_image(data, max_pixels=50_000)
