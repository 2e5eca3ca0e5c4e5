"""The collection over HTTP: POST/GET/DELETE /images, search by stored item, GET /index."""

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
from models.bundle import Bundle
from tests.synthetic import noise_png

pytestmark = pytest.mark.slow  # trains the session bundle


@pytest.fixture(scope="module")
def settings(trained_bundle_dir: Path, shapes_dir: Path, tmp_path_factory) -> Settings:
    index_dir = tmp_path_factory.mktemp("images-api") / "index"
    index_folder(shapes_dir, Bundle.load(trained_bundle_dir, "cpu"), index_dir, workers=0)
    # the two-epoch test bundle puts every image within cosine 0.9997 of every other one, so
    # only the same pixels count as a near-duplicate here
    return Settings(
        bundle_dir=trained_bundle_dir,
        index_dir=index_dir,
        device="cpu",
        duplicate_threshold=0.99999,
    )


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def reencoded(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def files(*blobs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", blob, "image/png")) for i, blob in enumerate(blobs)]


def size(client: TestClient) -> int:
    return client.get("/index").json()["size"]


def test_add_then_get_an_image(client: TestClient) -> None:
    data = noise_png(1)
    response = client.post(
        "/images", files=files(data), data={"label": "noise", "external_id": "n-1"}
    )
    assert response.status_code == 201, response.text
    [added] = response.json()["images"]
    assert added["label"] == "noise" and added["external_id"] == "n-1"
    assert added["duplicate_of"] is None
    item = client.get(f"/images/{added['id']}").json()
    assert item["external_id"] == "n-1" and item["label"] == "noise"
    assert client.get(item["url"]).content == data  # the service keeps the upload
    assert item["url"] == added["url"] == f"/images/{added['id']}/file" and "path" not in item


def test_a_second_external_id_is_409(client: TestClient) -> None:
    client.post("/images", files=files(noise_png(2)), data={"external_id": "n-2"})
    before = size(client)
    response = client.post("/images", files=files(noise_png(3)), data={"external_id": "n-2"})
    assert response.status_code == 409 and "n-2" in response.json()["detail"]
    assert size(client) == before


def test_many_files_in_one_request(client: TestClient) -> None:
    before = size(client)
    response = client.post("/images", files=files(noise_png(4), noise_png(5)))
    ids = [image["id"] for image in response.json()["images"]]
    assert response.status_code == 201 and len(set(ids)) == 2
    assert size(client) == before + 2
    response = client.post(
        "/images", files=files(noise_png(6), noise_png(7)), data={"external_id": "x"}
    )
    assert response.status_code == 422 and "single file" in response.json()["detail"]


def test_a_near_duplicate_is_flagged_and_can_be_skipped(
    client: TestClient, shapes_dir: Path
) -> None:
    path = shapes_dir / "square" / "square_004.png"
    stored = client.post("/similar?k=1", files={"file": ("a.png", reencoded(path.read_bytes()))})
    stored_id = stored.json()["neighbours"][0]["id"]
    copy = reencoded(path.read_bytes())
    before = size(client)
    [skipped] = client.post("/images?skip_duplicates=true", files=files(copy)).json()["images"]
    assert skipped["id"] is None and skipped["duplicate_of"]["id"] == stored_id
    assert skipped["duplicate_of"]["score"] >= 0.97 and size(client) == before
    [added] = client.post("/images", files=files(copy)).json()["images"]
    assert added["id"] is not None and added["duplicate_of"]["id"] == stored_id
    assert size(client) == before + 1


def test_delete_then_it_is_gone(client: TestClient, settings: Settings) -> None:
    data = noise_png(8)
    [added] = client.post("/images", files=files(data)).json()["images"]
    item_id = added["id"]
    found = client.post("/similar?k=5", files={"file": ("q.png", reencoded(data))}).json()
    assert found["neighbours"][0]["id"] == item_id
    assert client.delete(f"/images/{item_id}").status_code == 204
    kept = settings.resolved_index_dir() / "images" / f"{added['sha256']}.png"
    assert not kept.exists() and client.get(added["url"]).status_code == 404
    found = client.post("/similar?k=100", files={"file": ("q.png", reencoded(data))}).json()
    assert item_id not in [n["id"] for n in found["neighbours"]]
    for response in (
        client.get(f"/images/{item_id}"),
        client.delete(f"/images/{item_id}"),
        client.get(f"/images/{item_id}/similar"),
    ):
        assert response.status_code == 404
        assert response.json() == {"detail": f"there is no image with id {item_id}"}
    assert client.get("/images/not-a-number").status_code == 422


def test_similar_to_a_stored_image(client: TestClient) -> None:
    body = client.get("/images/1/similar", params={"k": 5}).json()
    ids = [n["id"] for n in body["neighbours"]]
    assert len(ids) == 5 and 1 not in ids
    label = client.get("/images/1").json()["label"]
    other = next(name for name in ("circle", "star") if name != label)
    body = client.get("/images/1/similar", params={"k": 50, "label": other}).json()
    assert {n["label"] for n in body["neighbours"]} == {other} and len(body["neighbours"]) == 10


def test_index_reports_itself(client: TestClient, settings: Settings) -> None:
    body = client.get("/index").json()
    assert body["index_type"] == "Flat" and body["dim"] == 32
    assert body["model"] == client.get("/health").json()["model"]
    assert body["size"] == client.get("/health").json()["index_size"]
    assert body["last_change"] >= body["size"]


def test_writes_survive_a_restart(settings: Settings, client: TestClient) -> None:
    response = client.post("/images", files=files(noise_png(9)), data={"label": "kept"})
    [added] = response.json()["images"]
    before = client.get("/index").json()
    with TestClient(create_app(settings)) as second:
        assert second.get("/index").json()["size"] == before["size"]
        assert second.get(f"/images/{added['id']}").json()["label"] == "kept"


def test_the_first_add_starts_a_collection(trained_bundle_dir: Path, tmp_path: Path) -> None:
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_bundle_dir / name, tmp_path / name)
    with TestClient(create_app(Settings(bundle_dir=tmp_path, device="cpu"))) as client:
        assert client.get("/index").status_code == 503
        assert client.post("/images", files=files(noise_png(10))).status_code == 201
        assert client.get("/index").json()["size"] == 1
    assert (tmp_path / "index" / "items.sqlite").is_file()
