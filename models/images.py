"""Decode one image safely: size limits, truncation, EXIF rotation, any mode to RGB.

Pillow decodes images up to IN_MEMORY_PIXELS whole (JPEGs reduced by DCT scaling when a
draft size is given). Larger ones (scanned drawings: a few MB of PNG declaring hundreds of
megapixels) are decoded by libvips, which streams the rows and shrinks while reading, straight
to the short side the caller needs; memory then depends on the width, not on the pixel count.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import numpy as np
import pyvips
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from models.errors import ImageTooLarge, UnsupportedImage

IN_MEMORY_PIXELS = 40_000_000  # ~6300 x 6300, 120 MB as RGB: Pillow decodes up to this whole
# The hard limit is on time, not memory: libvips decodes any size in bounded memory, but it
# must inflate every declared row. 1 Gpx is 1.5x the largest real drawings (~650 Mpx) and a
# few seconds of one core; a file declaring more is a decompression bomb, not a drawing.
DEFAULT_MAX_PIXELS = 1_000_000_000
DEFAULT_REDUCED_SIDE = 1024  # short side of a libvips-reduced image when no draft size is given
READABLE_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# Formats (Pillow's names) that libvips reduces in bounded memory. Not GIF: libvips decodes a
# whole frame first (940 MB for 200 Mpx). Not BMP and the like: libvips cannot read them.
REDUCED_BY_LIBVIPS = frozenset({"PNG", "TIFF", "WEBP", "MPO"})
LIBVIPS_LOAD_OPTIONS = "fail_on=truncated"  # libvips' default would return a partial image

# The limit is ours: _check_pixels reads the header and applies the caller's max_pixels before
# any decoding. Pillow's global check would refuse (above 2x its value) what a caller allows,
# with a different message, in every Image.open of the process, headers read elsewhere included.
Image.MAX_IMAGE_PIXELS = None


def load_image(
    source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode a file or bytes into an upright RGB image, or raise UnsupportedImage saying why.

    `draft_size` is the smallest short side the caller needs: JPEGs are decoded no smaller than
    it, images over IN_MEMORY_PIXELS are reduced to it (DEFAULT_REDUCED_SIDE if None).
    """
    if isinstance(source, bytes) and not source:
        raise UnsupportedImage("the file is empty (0 bytes)")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:  # reads the header only
                _check_pixels(image, max_pixels)
                return _decode(image, source, draft_size)
    # Pillow's own check is off (MAX_IMAGE_PIXELS above); kept should a caller turn it back on.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"the image is too large to decode safely ({err})") from err
    except UnidentifiedImageError as err:
        raise UnsupportedImage(
            f"the file is not an image we can read (expected {READABLE_FORMATS})"
        ) from err
    except FileNotFoundError as err:
        raise UnsupportedImage(f"no such file: {source}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UnsupportedImage(f"the image data is truncated or corrupt ({err})") from err


def _check_pixels(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image has {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}"
        )
    if width == 0 or height == 0:
        raise UnsupportedImage("the image has no pixels")


def _decode(
    image: ImageFile.ImageFile, source: Path | bytes, draft_size: int | None
) -> Image.Image:
    """Pillow decodes what fits in memory, JPEGs with DCT scaling; libvips reduces the rest."""
    large = image.width * image.height > IN_MEMORY_PIXELS
    if large and image.format in REDUCED_BY_LIBVIPS:
        return _load_reduced(source, image.size, draft_size or DEFAULT_REDUCED_SIDE)
    if large and image.format != "JPEG":
        _check_pixels(image, IN_MEMORY_PIXELS)  # Pillow would decode it whole
    side = draft_size or (DEFAULT_REDUCED_SIDE if large else None)
    if side and image.format == "JPEG":
        image.draft("RGB", (side, side))  # big JPEGs: decode smaller (down to 1/8 of each side)
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def _load_reduced(source: Path | bytes, size: tuple[int, int], side: int) -> Image.Image:
    """Stream-decode with libvips, shrinking while reading, to a short side of `side`."""
    width, height = _reduced_box(*size, side)
    try:
        stream = (
            pyvips.Source.new_from_memory(source)
            if isinstance(source, bytes)
            else pyvips.Source.new_from_file(str(source))  # not by name: libvips caches names
        )
        # Rotation after the shrink, so that the box is in the stored (header) orientation.
        image = pyvips.Image.thumbnail_source(
            stream,
            width,
            height=height,
            size="down",
            no_rotate=True,
            option_string=LIBVIPS_LOAD_OPTIONS,
        )
        return _vips_to_rgb(image.autorot())
    except pyvips.Error as err:  # decoding is lazy: truncation shows while converting
        reason = " ".join((err.detail or err.message).split())
        raise UnsupportedImage(f"the image data is truncated or corrupt ({reason})") from err


def _reduced_box(width: int, height: int, side: int) -> tuple[int, int]:
    """The box that fitting the image into gives it a short side of `side`, never upscaling.

    Long slivers, which would still have over IN_MEMORY_PIXELS, are reduced to that instead."""
    scale = min(side / min(width, height), math.sqrt(IN_MEMORY_PIXELS / (width * height)), 1.0)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _vips_to_rgb(image: pyvips.Image) -> Image.Image:
    """8-bit sRGB with any alpha flattened onto white, as to_rgb does for Pillow images."""
    image = image.colourspace("srgb")
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    return Image.fromarray(image.cast("uchar").numpy())


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited onto white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: PIL's convert would clip to 255, so rescale first.
        values = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")
