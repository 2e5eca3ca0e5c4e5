"""The whole path as a user runs it: train, index, `imgsim serve`, then HTTP from outside."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.stages import index_folder
from models.bundle import Bundle
from tests.servers import free_port, start_server


@pytest.fixture(scope="module")
def server(trained_bundle_dir: Path, shapes_dir: Path, tmp_path_factory) -> Iterator[str]:
    index_dir = tmp_path_factory.mktemp("e2e-index")
    index_folder(shapes_dir, Bundle.load(trained_bundle_dir, "cpu"), index_dir, workers=0)
    port = free_port()
    process = start_server(trained_bundle_dir, index_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_classify_and_similar_over_http(server: str, shapes_dir: Path) -> None:
    image = shapes_dir / "triangle" / "triangle_007.png"
    files = {"file": (image.name, image.read_bytes(), "image/png")}
    classified = httpx.post(f"{server}/classify", files=files, timeout=60).json()
    assert len(classified["predictions"]) == 4  # top_k defaults to 5, there are 4 classes
    assert all({"label", "score"} <= set(p) for p in classified["predictions"])

    # The same pixels in other bytes: an upload whose bytes are stored is left out of its results.
    buffer = io.BytesIO()
    Image.open(image).save(buffer, "PNG", compress_level=1)
    same = {"file": (image.name, buffer.getvalue(), "image/png")}
    similar = httpx.post(f"{server}/similar", params={"k": 3}, files=same, timeout=60).json()
    first = similar["neighbours"][0]
    assert httpx.get(f"{server}{first['url']}", timeout=60).content == image.read_bytes()
    assert first["label"] == "triangle"
    assert first["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(similar["neighbours"]) == 3


@pytest.mark.slow
def test_bad_upload_over_http_is_4xx_and_the_server_keeps_serving(server: str) -> None:
    response = httpx.post(
        f"{server}/similar", files={"file": ("x.jpg", b"\xff\xd8\xff", "image/jpeg")}
    )
    assert response.status_code == 422 and "not an image" in response.json()["detail"]
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/docs").status_code == 200
