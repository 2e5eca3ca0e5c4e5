"""Thumbnails and files of stored images, the gallery's pages, and no server path in answers."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.synthetic import noise_png


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "service"


@pytest.fixture
def client(untrained_bundle: Callable[[Path], Path], folder: Path) -> Iterator[TestClient]:
    settings = Settings(bundle_dir=untrained_bundle(folder / "bundle"), device="cpu")
    with TestClient(create_app(settings)) as client:
        yield client


def wide_png() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(noise_png(1, 300))).resize((300, 150)).save(buffer, "PNG")
    return buffer.getvalue()


def add(client: TestClient, data: bytes, label: str | None = None) -> dict:
    response = client.post(
        "/images", files={"files": ("a.png", data)}, data={"label": label} if label else {}
    )
    assert response.status_code == 201, response.text
    return response.json()["images"][0]


def test_a_thumbnail_has_its_type_size_and_cache_headers(client: TestClient) -> None:
    added = add(client, wide_png())
    response = client.get(added["thumbnail_url"], params={"size": 64})
    assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(response.content)).size == (64, 32)
    etag = response.headers["etag"]
    assert etag.startswith('"') and added["sha256"][:32] in etag
    assert "immutable" in response.headers["cache-control"]
    again = client.get(added["thumbnail_url"], params={"size": 64}, headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    jpeg = client.get(added["thumbnail_url"], params={"size": 100, "format": "jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.headers["etag"] != etag
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    default = client.get(added["thumbnail_url"])
    assert max(Image.open(io.BytesIO(default.content)).size) == 256


def test_thumbnail_sizes_are_bounded_and_missing_images_are_404(client: TestClient) -> None:
    added = add(client, wide_png())
    for size in (0, 15, 513, 100_000):
        response = client.get(added["thumbnail_url"], params={"size": size})
        assert response.status_code == 422 and "size" in response.json()["detail"]
    for url in ("/images/999/thumbnail", "/images/999/file"):
        response = client.get(url)
        assert response.status_code == 404
        assert response.json() == {"detail": "there is no image with id 999"}


def test_the_file_is_the_original_with_its_type(client: TestClient, folder: Path) -> None:
    data = wide_png()
    added = add(client, data)
    response = client.get(added["url"])
    assert response.status_code == 200 and response.content == data
    assert response.headers["content-type"] == "image/png"
    for kept in (folder / "bundle" / "index" / "images").iterdir():
        kept.unlink()  # the file went missing under the service
    response = client.get(added["url"])
    assert response.status_code == 404 and "no longer on disk" in response.json()["detail"]
    assert client.get(added["thumbnail_url"] + "?size=33").status_code == 404


def test_the_gallery_is_listed_page_by_page_and_by_label(client: TestClient) -> None:
    ids = [add(client, noise_png(seed), "odd" if seed % 2 else "even")["id"] for seed in range(7)]
    add(client, noise_png(99))  # no label
    page = client.get("/images", params={"limit": 3}).json()
    assert [image["id"] for image in page["images"]] == ids[:3] and page["total"] == 8
    assert page["labels"] == {"": 1, "even": 4, "odd": 3}
    page = client.get("/images", params={"label": "odd", "offset": 1, "limit": 5}).json()
    assert [image["id"] for image in page["images"]] == ids[3::2] and page["total"] == 3
    assert client.get("/images", params={"label": ""}).json()["total"] == 1
    assert client.get("/images", params={"limit": 0}).status_code == 422
    image = page["images"][0]
    assert image["thumbnail_url"] == f"/images/{image['id']}/thumbnail"


def test_no_answer_contains_a_server_path(client: TestClient, folder: Path) -> None:
    added = add(client, noise_png(5), "x")
    answers = [
        client.post("/images", files={"files": ("b.png", noise_png(6))}).text,
        client.get(f"/images/{added['id']}").text,
        client.get("/images").text,
        client.get(f"/images/{added['id']}/similar").text,
        client.post("/similar", files={"file": ("q.png", noise_png(7))}).text,
        client.get("/index").text,
        client.get("/health").text,
        client.get("/").text,
        client.get("/openapi.json").text,
    ]
    root = str(folder.resolve())
    for answer in answers:
        assert root not in answer and "/tmp/" not in answer
