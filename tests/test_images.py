"""Decoding uploads and files: every failure is an UnsupportedImage with a reason."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import images
from models.errors import ImageTooLarge, UnsupportedImage
from models.images import load_image
from tests.pngstream import write_large_png


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


# Images over IN_MEMORY_PIXELS: libvips decodes them straight to the size the model needs.

BIG = (20_000, 10_000)  # 200 Mpx: over IN_MEMORY_PIXELS and over Pillow's own 179 Mpx limit
BLACK = (5_000, 2_500, 10_000, 5_000)  # x0, y0, x1, y1 of the black rectangle in BIG


@pytest.fixture(scope="module")
def big_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 0.6 MB PNG declaring 20000 x 10000 pixels, white with a black rectangle."""
    path = tmp_path_factory.mktemp("big") / "drawing.png"
    write_large_png(path, *BIG, rect=BLACK)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_huge_png_is_decoded_to_the_draft_size(big_png: Path, as_bytes: bool) -> None:
    source = big_png.read_bytes() if as_bytes else big_png
    decoded = load_image(source, draft_size=256)
    assert decoded.mode == "RGB" and decoded.size == (512, 256)  # short side 256, aspect 2:1
    scale = 256 / BIG[1]
    inside = ((BLACK[0] + BLACK[2]) / 2 * scale, (BLACK[1] + BLACK[3]) / 2 * scale)
    assert max(decoded.getpixel((round(inside[0]), round(inside[1])))) < 30
    assert min(decoded.getpixel((400, 200))) > 225


@pytest.mark.slow
def test_huge_png_decodes_in_bounded_memory(big_png: Path) -> None:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) through exec.
    code = (
        "import sys; from pathlib import Path; from models.images import load_image; "
        "image = load_image(Path(sys.argv[1]), draft_size=256); "
        "peak = [line.split()[1] for line in open('/proc/self/status') if 'VmHWM' in line]; "
        "print(image.size, peak[0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(big_png)], capture_output=True, text=True, check=True
    )
    size, peak_kb = done.stdout.rsplit(" ", 1)
    assert size == "(512, 256)"
    assert int(peak_kb) < 400 * 1024  # a whole RGB decode of 200 Mpx alone is 600 MB


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_bomb_is_refused_from_its_header(tmp_path: Path, as_bytes: bool) -> None:
    path = tmp_path / "bomb.png"
    write_large_png(path, 50_000, 50_000, rows=2)  # 2.5 Gpx declared; header and two rows
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"50000x50000 = 2,500,000,000 pixels; the limit is"):
        load_image(path.read_bytes() if as_bytes else path)
    assert time.perf_counter() - started < 1.0


@pytest.fixture
def via_libvips(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Image.Image]:
    """load_image with IN_MEMORY_PIXELS just under the image's pixels: libvips decodes it."""

    def decode(data: bytes, draft_size: int | None = None) -> Image.Image:
        with Image.open(io.BytesIO(data)) as header:
            monkeypatch.setattr(images, "IN_MEMORY_PIXELS", header.width * header.height - 1)
        return load_image(data, draft_size=draft_size)

    return decode


def test_libvips_path_converts_as_pillow_does(via_libvips: Callable[..., Image.Image]) -> None:
    transparent = via_libvips(encode(Image.new("RGBA", (8, 4), (255, 0, 0, 0))))
    assert transparent.mode == "RGB" and transparent.getpixel((0, 0)) == (255, 255, 255)
    grey16 = via_libvips(encode(Image.fromarray(np.full((4, 8), 32768, dtype=np.uint16)), "TIFF"))
    assert grey16.size == (8, 4) and 120 <= grey16.getpixel((0, 0))[0] <= 135
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert via_libvips(encode(Image.new("RGB", (6, 2)), exif=exif.tobytes())).size == (2, 6)


def test_libvips_path_reduces_but_never_enlarges(via_libvips: Callable[..., Image.Image]) -> None:
    image = Image.new("RGB", (90, 60), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 45, 60))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = via_libvips(encode(image, exif=exif.tobytes()), draft_size=30)
    assert rotated.size == (30, 45)  # short side 30 after rotation; black half now on top
    assert max(rotated.getpixel((15, 5))) < 30 and min(rotated.getpixel((15, 40))) > 225
    assert via_libvips(encode(image), draft_size=100).size == (90, 60)


def test_libvips_errors_say_truncated_or_corrupt(via_libvips: Callable[..., Image.Image]) -> None:
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(UnsupportedImage, match="truncated or corrupt") as caught:
        via_libvips(data[: len(data) // 2])
    assert type(caught.value) is UnsupportedImage


def test_a_truncated_huge_png_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    write_large_png(path, 10_000, 5_000, rows=100)  # 50 Mpx declared, 100 rows present
    with pytest.raises(UnsupportedImage, match="truncated or corrupt"):
        load_image(path, draft_size=64)


@pytest.mark.parametrize("fmt", ["BMP", "GIF"])
def test_format_libvips_cannot_reduce_is_refused_above_in_memory(
    monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setattr(images, "IN_MEMORY_PIXELS", 100)
    with pytest.raises(ImageTooLarge, match="the limit is 100"):
        load_image(encode(Image.new("RGB", (20, 10)), fmt))


def test_large_jpeg_without_draft_size_is_still_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "IN_MEMORY_PIXELS", 100)
    monkeypatch.setattr(images, "DEFAULT_REDUCED_SIDE", 8)
    assert load_image(encode(Image.new("RGB", (64, 48)), "JPEG")).size == (16, 12)  # DCT 1/4
