"""Decode one image safely: size limits, truncation, EXIF rotation, any mode to RGB."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import ImageTooLarge, UnsupportedImage

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300 x 6300; decoding more is a memory risk, not a photo
READABLE_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"


def load_image(
    source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None
) -> Image.Image:
    """Decode a file or bytes into an upright RGB image, or raise UnsupportedImage saying why."""
    if isinstance(source, bytes) and not source:
        raise UnsupportedImage("the file is empty (0 bytes)")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(stream) as image:
                _check_pixels(image, max_pixels)
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))  # big JPEGs: decode smaller
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
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
