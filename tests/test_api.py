"""The HTTP API in-process: /health, /classify, /similar and every kind of bad upload."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from app.stages import index_folder
from index.gallery import GalleryIndex
from models.bundle import Bundle
from tests.synthetic import noise_png


@pytest.fixture(scope="module")
def indexed_bundle(trained_bundle_dir: Path, shapes_dir: Path) -> Path:
    index_folder(
        shapes_dir, Bundle.load(trained_bundle_dir, "cpu"), trained_bundle_dir / "index", workers=0
    )
    return trained_bundle_dir


@pytest.fixture(scope="module")
def client(indexed_bundle: Path) -> Iterator[TestClient]:
    settings = Settings(
        bundle_dir=indexed_bundle, device="cpu", max_upload_bytes=200_000, max_pixels=1_000_000
    )
    with TestClient(create_app(settings)) as client:
        yield client


def solid_png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def upload(data: bytes, name: str = "x.png") -> dict:
    return {"file": (name, data, "image/png")}


def test_health(client: TestClient, indexed_bundle: Path) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["backbone"] == "resnet18"
    assert body["classes"] == 4 and body["index_size"] == 40 and body["device"] == "cpu"
    # The threshold training chose, by which rule, and what it gave on the val split.
    unknown = body["unknown_threshold"]
    assert unknown["threshold"] == Bundle.load(indexed_bundle, "cpu").config.threshold
    assert "val images" in unknown["rule"] and 0 < unknown["coverage"] <= 1


def test_page_shows_what_is_loaded(client: TestClient) -> None:
    page = client.get("/").text
    assert "resnet18" in page and f"{client.get('/health').json()['image_size']}" in page


def test_classify(client: TestClient, shapes_dir: Path) -> None:
    data = (shapes_dir / "star" / "star_000.png").read_bytes()
    body = client.post("/classify?top_k=3", files=upload(data)).json()
    scores = [p["score"] for p in body["predictions"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    best = body["predictions"][0]
    assert body["unknown"] == (body["threshold"] is not None and best["score"] < body["threshold"])
    assert body["label"] == ("unknown" if body["unknown"] else best["label"])
    assert {p["label"] for p in body["predictions"]} <= {"circle", "square", "star", "triangle"}


def reencoded(data: bytes) -> bytes:
    """The same pixels in other bytes: not the stored file, but the same embedding."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "PNG", compress_level=1)
    assert buffer.getvalue() != data
    return buffer.getvalue()


def test_similar_finds_the_indexed_image_first(client: TestClient, shapes_dir: Path) -> None:
    path = shapes_dir / "circle" / "circle_003.png"
    body = client.post("/similar?k=4", files=upload(reencoded(path.read_bytes()))).json()
    neighbours = body["neighbours"]
    assert len(neighbours) == 4
    assert client.get(neighbours[0]["url"]).content == path.read_bytes()
    assert neighbours[0]["label"] == "circle"
    assert neighbours[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert set(neighbours[0]) == {"id", "label", "score", "url", "thumbnail_url"}


def test_similar_leaves_out_the_query_itself_and_filters_by_label(
    client: TestClient, shapes_dir: Path
) -> None:
    path = shapes_dir / "circle" / "circle_003.png"
    body = client.post("/similar?k=40", files=upload(path.read_bytes())).json()
    found = [client.get(n["url"]).content for n in body["neighbours"]]
    assert path.read_bytes() not in found and len(found) == 39
    body = client.post("/similar?k=40&label=star", files=upload(path.read_bytes())).json()
    assert [n["label"] for n in body["neighbours"]] == ["star"] * 10


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 422, "empty"),
        (b"%PDF-1.4 not an image", 422, "not an image"),
        (noise_png(0, 64)[:300], 422, "truncated"),
        (solid_png((1100, 1000)), 413, "pixels"),
        (b"\0" * 200_001, 413, "larger than the limit"),
    ],
)
@pytest.mark.parametrize("route", ["/classify", "/similar"])
def test_bad_uploads_get_a_clear_4xx(
    client: TestClient, route: str, data: bytes, status: int, words: str
) -> None:
    response = client.post(route, files=upload(data))
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_missing_file_and_bad_parameters(client: TestClient) -> None:
    response = client.post("/similar")
    assert response.status_code == 422 and "file" in response.json()["detail"]
    response = client.post("/classify?top_k=0", files=upload(noise_png(0, 64)))
    assert response.status_code == 422 and "top_k" in response.json()["detail"]


def test_similar_without_an_index_is_503(trained_bundle_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_bundle_dir / name, tmp_path / name)
    with TestClient(create_app(Settings(bundle_dir=tmp_path, device="cpu"))) as client:
        assert client.get("/health").json()["index_size"] is None
        response = client.post("/similar", files=upload(noise_png(0, 64)))
    assert response.status_code == 503 and "imgsim index" in response.json()["detail"]


def test_an_index_of_another_model_is_refused_at_startup(
    indexed_bundle: Path, tmp_path: Path
) -> None:
    from index.errors import ModelMismatch

    pretrained = Bundle.pretrained("resnet18", weights="none", device="cpu")
    pretrained.save(tmp_path)
    settings = Settings(bundle_dir=tmp_path, index_dir=indexed_bundle / "index", device="cpu")
    with pytest.raises(ModelMismatch), TestClient(create_app(settings)):
        pass


@pytest.mark.slow
def test_indexing_again_adds_only_new_files_and_a_new_bundle_rebuilds(
    trained_bundle_dir: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "gallery"
    for name in ("circle", "star"):
        shutil.copytree(shapes_dir / name, folder / name)
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    first = index_folder(folder, bundle, tmp_path / "index", workers=0)
    assert len(first) == 20
    shutil.copytree(shapes_dir / "square", folder / "square")
    shutil.copy(folder / "star" / "star_000.png", folder / "square" / "same_bytes.png")
    again = index_folder(folder, bundle, tmp_path / "index", workers=0)
    assert len(again) == 30  # the copy of star_000 is already indexed
    reloaded = GalleryIndex.load(tmp_path / "index", bundle.fingerprint)
    assert reloaded.get(1).path == str((folder / "circle" / "circle_000.png").resolve())
    assert reloaded.labels() == {"circle": 10, "star": 10, "square": 10}
    reloaded.close()

    other = Bundle.pretrained("resnet18", weights="none", device="cpu")
    rebuilt = index_folder(folder, other, tmp_path / "index", workers=0)
    assert len(rebuilt) == 31 and rebuilt.fingerprint == other.fingerprint
    assert GalleryIndex.load(tmp_path / "index", other.fingerprint).dim == other.embedding_dim


def test_relative_folders_are_made_absolute(
    trained_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(trained_bundle_dir.parent)
    settings = Settings(bundle_dir=Path(trained_bundle_dir.name), index_dir=Path("idx"))
    assert settings.bundle_dir == trained_bundle_dir.resolve()
    assert settings.index_dir == (trained_bundle_dir.parent / "idx").resolve()
