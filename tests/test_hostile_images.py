"""Tiny files declaring huge or extreme images cost bounded memory; only our formats are read."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from models.errors import (
    AspectRatioTooLarge,
    ImageTooLarge,
    UnsupportedFormat,
    UnsupportedImage,
)
from models.images import MAX_ASPECT_RATIO, load_image
from tests.pngstream import write_large_png

EXTRA_RSS_LIMIT_MB = 200

# Decode as every stage does (models.transforms.decode, then resized) in a fresh process; print the
# peak RSS above what the process held before (VmHWM reset through /proc/self/clear_refs).
MEASURE = """
import sys
from pathlib import Path
from models.backbones import Preprocessing
from models.transforms import decode, resized
from models.errors import UnsupportedImage
pre = Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
def peak():
    return int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))
open('/proc/self/clear_refs', 'w').write('5')
before = peak()
try:
    outcome = tuple(resized(decode(Path(sys.argv[1]), pre), pre).shape)
except UnsupportedImage as err:
    outcome = type(err).__name__
print(outcome, (peak() - before) // 1024)
"""


def decoded_in_subprocess(path: Path) -> tuple[str, int]:
    """What decoding the file gives (a tensor shape or an error class) and the extra MB."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True
    )
    outcome, extra_mb = done.stdout.strip().rsplit(" ", 1)
    return outcome, int(extra_mb)


def jpeg(size: tuple[int, int], **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buffer, "JPEG", quality=10, **params)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The reproductions of issue 12: tiny files declaring huge or extreme images."""
    folder = tmp_path_factory.mktemp("hostile")
    files = {name: folder / name for name in ("wide.png", "square.jpg", "progressive.jpg")}
    assert write_large_png(files["wide.png"], 100_000, 10) < 4_000  # 2,986 bytes in the issue
    files["square.jpg"].write_bytes(jpeg((6000, 6000)))
    files["progressive.jpg"].write_bytes(jpeg((6000, 6000), progressive=True, subsampling=0))
    for name, size in (("tall.png", (1, 40_000_000)), ("long.png", (40_000_000, 1))):
        files[name] = folder / name
        write_large_png(files[name], *size, rows=0)  # the header is all that is read
    return files


@pytest.mark.parametrize(
    ("name", "outcome"),
    [
        ("wide.png", "AspectRatioTooLarge"),  # was: 200 after 3.7 s and +1.95 GB
        ("square.jpg", "(3, 256, 256)"),  # was: +600 MB; now reduced while decoding
        ("progressive.jpg", "ImageTooLarge"),  # libjpeg would hold 206 MB of coefficients
        ("tall.png", "AspectRatioTooLarge"),  # was: 500, torch asked for 7.8 TB
        ("long.png", "AspectRatioTooLarge"),
    ],
)
def test_reproductions_cost_bounded_memory(
    hostile: dict[str, Path], name: str, outcome: str
) -> None:
    got, extra_mb = decoded_in_subprocess(hostile[name])
    assert got == outcome
    assert extra_mb < EXTRA_RSS_LIMIT_MB


def test_a_large_square_png_is_reduced_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    write_large_png(path, 6300, 6300)  # 40 Mpx, 126 KB: was decoded whole (+454 MB)
    assert decoded_in_subprocess(path) == ("(3, 256, 256)", pytest.approx(50, abs=50))


@pytest.mark.parametrize("size", [(1, 40_000_000), (40_000_000, 1), (100_000, 10), (10, 211)])
def test_extreme_aspect_ratios_say_the_size_and_the_limit(
    tmp_path: Path, size: tuple[int, int]
) -> None:
    path = tmp_path / "sliver.png"
    write_large_png(path, *size, rows=0)
    with pytest.raises(AspectRatioTooLarge) as caught:
        load_image(path)
    assert f"{size[0]}x{size[1]} pixels" in str(caught.value)
    assert f"the limit is {MAX_ASPECT_RATIO}:1" in str(caught.value)


def test_the_limit_itself_is_accepted() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (MAX_ASPECT_RATIO * 3, 3)).save(buffer, "PNG")
    assert load_image(buffer.getvalue()).size == (MAX_ASPECT_RATIO * 3, 3)


def test_a_progressive_jpeg_over_the_budget_says_why() -> None:
    with pytest.raises(ImageTooLarge, match="progressive JPEG of 6000x6000 pixels.*206 MB"):
        load_image(jpeg((6000, 6000), progressive=True, subsampling=0))
    assert load_image(jpeg((3000, 2000), progressive=True), draft_size=256).size == (750, 500)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
PSD = b"8BPS\x00\x01" + bytes(40)


def encoded(fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (30, 120, 210)).save(buffer, fmt, **params)
    return buffer.getvalue()


REFUSED = {"EPS": EPS, "PSD": PSD, "ICO": encoded("ICO"), "PCX": encoded("PCX")}
ACCEPTED = {
    "JPEG": encoded("JPEG"),
    "MPO": encoded("MPO", save_all=True, append_images=[Image.new("RGB", (48, 32))]),
    "PNG": encoded("PNG"),
    "WEBP": encoded("WEBP"),
    "GIF": encoded("GIF"),
    "BMP": encoded("BMP"),
    "TIFF": encoded("TIFF"),
}


@pytest.mark.parametrize("fmt", REFUSED)
def test_other_formats_are_refused_before_a_plugin_opens_them(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def opened(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"Pillow's {fmt} plugin was asked to open the file")

    monkeypatch.setitem(Image.OPEN, fmt, (opened, Image.OPEN[fmt][1]))
    with pytest.raises(UnsupportedFormat, match=f"{fmt} images are not accepted; send JPEG, PNG"):
        load_image(REFUSED[fmt])


@pytest.mark.parametrize("compression", [None, "tga_rle"])
def test_a_tga_is_called_tga_not_a_cursor(compression: str | None, tmp_path: Path) -> None:
    # An uncompressed TGA starts 00 00 02 00, which is all Pillow's CUR check reads.
    data = encoded("TGA", compression=compression)
    path = tmp_path / "drawing.tga"
    path.write_bytes(data)
    for source in (data, path):
        with pytest.raises(UnsupportedFormat, match="^TGA images are not accepted; send JPEG"):
            load_image(source)


def test_a_cursor_is_still_called_a_cursor() -> None:
    entry = struct.pack("<BBBBHHII", 32, 32, 0, 0, 1, 1, 4096, 22)  # one 32x32 image
    with pytest.raises(UnsupportedFormat, match="^CUR images are not accepted"):
        load_image(b"\0\0\2\0\1\0" + entry + bytes(64))


@pytest.mark.parametrize("data", [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a"])
def test_a_broken_file_of_an_accepted_format_is_not_called_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImage, match="not an image we can read") as caught:
        load_image(data)
    assert not isinstance(caught.value, UnsupportedFormat)


@pytest.fixture(scope="module")
def client(trained_bundle_dir: Path) -> Iterator[TestClient]:
    """The API over the session bundle."""
    settings = Settings(bundle_dir=trained_bundle_dir, device="cpu")
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.slow
@pytest.mark.parametrize("fmt", REFUSED)
def test_refused_formats_are_415(client: TestClient, fmt: str) -> None:
    response = client.post("/classify", files={"file": ("x", REFUSED[fmt])})
    assert response.status_code == 415
    assert response.json()["detail"].startswith(f"{fmt} images are not accepted")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ACCEPTED)
def test_accepted_formats_classify(client: TestClient, fmt: str) -> None:
    response = client.post("/classify", files={"file": ("x", ACCEPTED[fmt])})
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_extreme_aspect_ratio_is_422_saying_the_limit(
    client: TestClient, hostile: dict[str, Path]
) -> None:
    response = client.post("/classify", files={"file": ("x", hostile["tall.png"].read_bytes())})
    assert response.status_code == 422
    assert "1x40000000 pixels" in response.json()["detail"]
    assert f"limit is {MAX_ASPECT_RATIO}:1" in response.json()["detail"]


@pytest.mark.slow
def test_reproductions_cost_bounded_memory_in_a_server(
    trained_bundle_dir: Path, hostile: dict[str, Path], tmp_path: Path
) -> None:
    """The issue's measurement: the server's own peak RSS while it answers each file."""
    import httpx

    from index.gallery import GalleryIndex
    from models.bundle import Bundle
    from tests.servers import free_port, start_server

    bundle = Bundle.load(trained_bundle_dir, "cpu")
    GalleryIndex.create(bundle.embedding_dim, bundle.fingerprint, tmp_path / "index").close()
    port = free_port()
    server = start_server(trained_bundle_dir, tmp_path / "index", port)
    status = Path(f"/proc/{server.pid}/status")

    def peak_kb() -> int:
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1])

    try:
        expected = {"wide.png": 422, "square.jpg": 200, "progressive.jpg": 413, "tall.png": 422}
        for name, code in expected.items():
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # peak := current RSS
            before = peak_kb()
            response = httpx.post(
                f"http://127.0.0.1:{port}/classify",
                files={"file": (name, hostile[name].read_bytes())},
                timeout=60,
            )
            assert response.status_code == code, response.text
            assert (peak_kb() - before) // 1024 < EXTRA_RSS_LIMIT_MB, name
    finally:
        server.terminate()
        server.wait(timeout=30)
