"""Decode one image safely: a format allow-list, size, shape and cost limits read from the
header before any decoding, truncation, EXIF rotation, any mode to RGB.

Every decode holds at most about DECODE_BUDGET bytes of pixels, whatever the file declares.
Pillow decodes images up to IN_MEMORY_PIXELS whole, then reduces them by an integer factor to
no less than the size the caller needs (JPEGs are reduced while decoding, by DCT scaling).
Larger ones (scanned drawings: a few MB of PNG declaring hundreds of megapixels) are decoded by
libvips, which streams the rows and shrinks while reading, straight to the short side the caller
needs; memory then depends on the width, not on the pixel count. What neither can decode within
the budget (a progressive JPEG, an interlaced PNG or a single-strip TIFF above it) is refused.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pyvips
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from models.errors import AspectRatioTooLarge, ImageTooLarge, UnsupportedFormat, UnsupportedImage

# The formats we decode, as Pillow names them, and as a person names them. Pillow is never
# asked to open anything else (EPS would run Ghostscript, PSD, ICO, PCX... are attack surface).
# JPEG's plugin also opens multi-picture JPEGs (MPO, from cameras and phones): the first picture.
ACCEPTED_FORMATS = {
    "JPEG": "JPEG",
    "PNG": "PNG",
    "WEBP": "WebP",
    "GIF": "GIF",
    "BMP": "BMP",
    "TIFF": "TIFF",
}


def _either(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}"


READABLE_FORMATS = _either(list(ACCEPTED_FORMATS.values()))  # "JPEG, PNG, ... or TIFF"

MAX_ASPECT_RATIO = 20  # long side / short side; resizing the short side scales memory by it
DECODE_BUDGET = 128 * 2**20  # bytes of pixels (or JPEG coefficients) one decode may hold
IN_MEMORY_PIXELS = DECODE_BUDGET // 4  # ~33.5 Mpx: Pillow holds RGB(A) at 4 bytes a pixel
# The hard limit is on time, not memory: libvips decodes any size in bounded memory, but it
# must inflate every declared row. 1 Gpx is 1.5x the largest real drawings (~650 Mpx) and a
# few seconds of one core; a file declaring more is a decompression bomb, not a drawing.
DEFAULT_MAX_PIXELS = 1_000_000_000
DEFAULT_REDUCED_SIDE = 1024  # short side of a reduced image when no draft size is given
# Formats (Pillow's names) that libvips reduces in bounded memory. Not GIF: libvips decodes a
# whole frame first (940 MB for 200 Mpx). Not BMP and the like: libvips cannot read them.
REDUCED_BY_LIBVIPS = frozenset({"PNG", "TIFF", "WEBP", "MPO"})
LIBVIPS_LOAD_OPTIONS = "fail_on=truncated"  # libvips' default would return a partial image
REDUCIBLE_MODES = frozenset({"L", "LA", "PA", "RGB", "RGBA", "CMYK", "I", "F", "YCbCr"})

# The limit is ours: _check_header reads the header and applies the caller's max_pixels before
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
            # Only our formats' plugins are tried; each reads the header only.
            with Image.open(stream, formats=list(ACCEPTED_FORMATS)) as image:
                _check_header(image, max_pixels)
                return _decode(image, source, draft_size)
    # Pillow's own check is off (MAX_IMAGE_PIXELS above); kept should a caller turn it back on.
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(f"the image is too large to decode safely ({err})") from err
    except UnidentifiedImageError as err:
        other = format_of(source)
        if other is not None and other not in ACCEPTED_FORMATS:  # not a broken file of ours
            raise UnsupportedFormat(
                f"{other} images are not accepted; send {READABLE_FORMATS}"
            ) from err
        raise UnsupportedImage(
            f"the file is not an image we can read (expected {READABLE_FORMATS})"
        ) from err
    except FileNotFoundError as err:
        raise UnsupportedImage(f"no such file: {source}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UnsupportedImage(f"the image data is truncated or corrupt ({err})") from err


TGA_FOOTER = b"TRUEVISION-XFILE.\0"  # how a TGA 2.0 file ends; TGA has no signature at its start
# Pillow's prefix checks for these match any file starting 00 00 01 00 (ICO) or 00 00 02 00
# (CUR), an uncompressed TGA's header among them; a real icon or cursor holds 1+ images.
COUNTED_FORMATS = frozenset({"ICO", "CUR"})


def format_of(source: Path | bytes) -> str | None:
    """The name of the image format the file announces, as Pillow's plugins recognise it from
    its first bytes (their prefix checks only: no plugin opens the file), or TGA from its
    footer; None if none does."""
    try:
        if isinstance(source, bytes):
            prefix, suffix = source[:16], source[-len(TGA_FOOTER) :]
        else:
            with source.open("rb") as file:
                prefix = file.read(16)
                file.seek(max(0, file.seek(0, io.SEEK_END) - len(TGA_FOOTER)))
                suffix = file.read()
    except OSError:
        return None
    if suffix == TGA_FOOTER:
        return "TGA"
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                if name in COUNTED_FORMATS and prefix[4:6] == b"\0\0":
                    continue  # no image in it: not an icon or cursor
                return name
        except (IndexError, struct.error, ValueError):  # some checks assume enough bytes
            continue
    return None


def _check_header(image: ImageFile.ImageFile, max_pixels: int) -> None:
    """Refuse, from the header alone, what is too large, too long or too costly to decode."""
    _check_pixels(image, max_pixels)
    width, height = image.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise AspectRatioTooLarge(
            f"the image is {width}x{height} pixels, {max(width, height) / min(width, height):,.0f}"
            f" times longer than wide; the limit is {MAX_ASPECT_RATIO}:1"
        )
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        need = _coefficient_bytes(image)
        if need > DECODE_BUDGET:
            raise ImageTooLarge(
                f"the image is a progressive JPEG of {width}x{height} pixels, which takes "
                f"{need / 2**20:,.0f} MB to decode; the limit is {DECODE_BUDGET / 2**20:,.0f} MB"
                " (save it as a baseline JPEG or a PNG, or make it smaller)"
            )


def _check_pixels(image: Image.Image, max_pixels: int, why: str = "") -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image has {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}{why}"
        )
    if width == 0 or height == 0:
        raise UnsupportedImage("the image has no pixels")


def _coefficient_bytes(image: ImageFile.ImageFile) -> int:
    """What libjpeg holds to decode a progressive JPEG: every DCT coefficient of every
    component at full size (2 bytes each), whatever the DCT scaling."""
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)] * len(image.getbands())
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    blocks = sum(
        math.ceil(image.width * h / h_max / 8) * math.ceil(image.height * v / v_max / 8)
        for _, h, v, _ in layers
    )
    return blocks * 64 * 2


def _streamed_by_libvips(image: ImageFile.ImageFile) -> bool:
    """Whether libvips can reduce this image while reading it, in bounded memory: not an
    interlaced PNG, nor a TIFF whose strips or tiles are over the budget (decoded whole)."""
    if image.format not in REDUCED_BY_LIBVIPS:
        return False
    if image.format == "PNG":
        return not image.info.get("interlace")
    if image.format == "TIFF":
        tags = image.tag_v2
        rows = tags.get(323) or tags.get(278) or image.height  # tile length, rows per strip
        columns = tags.get(322) or image.width  # tile width
        return min(rows, image.height) * columns * len(image.getbands()) * 2 <= DECODE_BUDGET
    return True


def _decode(
    image: ImageFile.ImageFile, source: Path | bytes, draft_size: int | None
) -> Image.Image:
    """Pillow decodes what fits in memory, JPEGs with DCT scaling, and reduces it at once;
    libvips reduces the rest while reading."""
    large = image.width * image.height > IN_MEMORY_PIXELS
    if large and _streamed_by_libvips(image):
        return _load_reduced(source, image.size, draft_size or DEFAULT_REDUCED_SIDE)
    if large and image.format != "JPEG":  # Pillow would decode it whole
        _check_pixels(image, IN_MEMORY_PIXELS, f" for a {image.format} image of this kind")
    side = draft_size or (DEFAULT_REDUCED_SIDE if large else None)
    if side and image.format == "JPEG":
        image.draft("RGB", (side, side))  # big JPEGs: decode smaller (down to 1/8 of each side)
    image.load()
    if side:
        image = _reduced(image, side)
    return to_rgb(ImageOps.exif_transpose(image))


def _reduced(image: Image.Image, side: int) -> Image.Image:
    """The decoded image shrunk by the largest integer factor that keeps its short side at
    least `side` (a box filter, as DCT scaling is), so that no later step copies it whole."""
    factor = min(image.size) // side
    if factor < 2 or image.mode not in REDUCIBLE_MODES:
        return image
    reduced = image.reduce(factor)
    # What follows reads the orientation (from the file's tags, for a TIFF) and transparency.
    reduced.info = {**image.info, "exif": image.getexif().tobytes()}
    return reduced


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
