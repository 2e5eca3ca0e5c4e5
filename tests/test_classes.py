"""Classes added from a few examples without retraining (POST /classes and friends), and
/classify?by=neighbours."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.cli import main
from app.main import create_app
from app.settings import Settings
from app.stages import index_folder
from models.bundle import Bundle
from models.imprint import (
    MAX_NAME_LENGTH,
    AddedClass,
    Classifier,
    added_from,
    neighbour_vote,
)
from models.layout import BundleLayout
from tests.synthetic import noise_png

KEY = "a-key-for-the-tests-0123456789"


@pytest.fixture
def bundle_dir(trained_bundle_dir: Path, shapes_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the trained bundle, with an index of the shapes."""
    directory = tmp_path / "bundle"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_bundle_dir / name, directory / name)
    index_folder(
        shapes_dir, Bundle.load(directory, "cpu"), BundleLayout(directory).index, workers=0
    )
    return directory


@pytest.fixture
def serve(bundle_dir: Path) -> Callable[..., TestClient]:
    def make(**values: object) -> TestClient:
        return TestClient(create_app(Settings(bundle_dir=bundle_dir, device="cpu", **values)))

    return make


@pytest.fixture
def client(serve: Callable[..., TestClient]) -> Iterator[TestClient]:
    with serve() as client:
        yield client


def files(*pngs: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]


def classify(client: TestClient, png: bytes, **params: object) -> dict:
    answer = client.post("/classify", files={"file": ("q.png", png)}, params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_class_from_one_image_answers_at_once_and_survives_a_restart(
    client: TestClient, serve: Callable[..., TestClient]
) -> None:
    example = noise_png(7)
    before = classify(client, example)
    health = client.get("/health").json()
    assert before["classifier"] == before["model"] == health["classifier"]
    assert health["added_classes"] == 0

    added = client.post("/classes", data={"name": "noise"}, files=files(example))
    assert added.status_code == 201, added.text
    listing = added.json()
    assert listing["classes"][-1] == {"name": "noise", "source": "added", "examples": 1}
    assert [c["source"] for c in listing["classes"][:-1]] == ["trained"] * 4

    after = classify(client, example)  # its own example: cosine 1, above every trained row
    assert after["label"] == "noise" and after["method"] == "classifier"
    assert after["model"] == before["model"]  # the embedding, so the index, is unchanged
    assert after["classifier"] != before["classifier"] == after["model"]
    assert (
        after["classifier"] == listing["classifier"] == client.get("/health").json()["classifier"]
    )
    metrics = client.get("/metrics").text
    assert f'classifier="{after["classifier"]}"' in metrics and 'added_classes="1"' in metrics
    assert sum(p["score"] for p in classify(client, example, top_k=5)["predictions"]) == (
        pytest.approx(1, abs=1e-5)
    )

    client.close()
    with serve() as restarted:  # kept with the collection
        assert restarted.get("/classes").json() == listing
        assert classify(restarted, example)["label"] == "noise"


def test_examples_from_stored_images_move_the_row_to_the_mean(client: TestClient) -> None:
    client.post("/classes", data={"name": "noise"}, files=files(noise_png(1)))
    circles = client.get("/images", params={"label": "circle", "limit": 3}).json()["images"]
    ids = [image["id"] for image in circles]
    grown = client.post("/classes/noise/examples", data={"ids": ids}, files=files(noise_png(2)))
    assert grown.status_code == 200, grown.text
    assert grown.json()["classes"][-1] == {"name": "noise", "source": "added", "examples": 5}
    missing = client.post("/classes/noise/examples", data={"ids": [10**9]})
    assert missing.status_code == 404 and str(10**9) in missing.json()["detail"]


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("", 422),
        ("   ", 422),
        ("unknown", 422),
        ("x" * (MAX_NAME_LENGTH + 1), 422),
        ("circle", 409),
    ],
)
def test_names_are_checked(client: TestClient, name: str, status: int) -> None:
    answer = client.post("/classes", data={"name": name}, files=files(noise_png(1)))
    assert answer.status_code == status and answer.json()["detail"]
    assert len(client.get("/classes").json()["classes"]) == 4  # nothing added


def test_what_cannot_change_is_refused_with_a_reason(client: TestClient) -> None:
    assert client.post("/classes", data={"name": "a"}).status_code == 422  # no examples
    assert client.post("/classes", data={"name": "a"}, files=files(noise_png(1))).status_code == 201
    again = client.post("/classes", data={"name": "a"}, files=files(noise_png(2)))
    assert again.status_code == 409 and "already" in again.json()["detail"]
    assert client.delete("/classes/circle").status_code == 409  # trained
    assert client.post("/classes/circle/examples", files=files(noise_png(3))).status_code == 409
    assert client.delete("/classes/b").status_code == 404
    assert client.post("/classes/b/examples", files=files(noise_png(3))).status_code == 404
    assert client.delete("/classes/a").status_code == 204
    assert [c["name"] for c in client.get("/classes").json()["classes"]] == [
        "circle",
        "square",
        "star",
        "triangle",
    ]
    assert classify(client, noise_png(1))["classifier"] == classify(client, noise_png(1))["model"]


def test_writes_need_the_key(serve: Callable[..., TestClient]) -> None:
    with serve(api_key=KEY) as keyed:
        refused = keyed.post("/classes", data={"name": "a"}, files=files(noise_png(1)))
        assert refused.status_code == 401
        assert keyed.delete("/classes/a").status_code == 401
        assert keyed.get("/classes").status_code == 200  # reads are open
        headers = {"Authorization": f"Bearer {KEY}"}
        added = keyed.post(
            "/classes", data={"name": "a"}, files=files(noise_png(1)), headers=headers
        )
        assert added.status_code == 201


def test_a_linear_head_cannot_take_examples(
    untrained_bundle: Callable[[Path], Path], tmp_path: Path
) -> None:
    settings = Settings(bundle_dir=untrained_bundle(tmp_path / "b"), device="cpu")
    with TestClient(create_app(settings)) as client:
        answer = client.post("/classes", data={"name": "a"}, files=files(noise_png(1)))
        assert answer.status_code == 409 and "by=neighbours" in answer.json()["detail"]


def test_neighbours_vote_with_the_collection_labels(client: TestClient, shapes_dir: Path) -> None:
    star = next((shapes_dir / "star").glob("*.png")).read_bytes()
    answer = classify(client, star, by="neighbours", k=5)
    assert answer["method"] == "neighbours" and answer["label"] == "star"  # itself is stored
    assert sum(p["score"] for p in answer["predictions"]) == pytest.approx(1)
    # An image added with a new label votes at once.
    added = client.post("/images", data={"label": "noise"}, files=files(noise_png(4)))
    assert added.status_code == 201
    assert classify(client, noise_png(4), by="neighbours", k=1)["label"] == "noise"


def test_imprinted_rows_are_normalised_means_on_the_trained_scale() -> None:
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(3, 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    centre = np.full(8, 0.1)
    added = added_from("new", unit[:2], centre)
    np.testing.assert_allclose(added.weight, _normalised(unit[:2].mean(0) - centre), atol=1e-6)
    grown = added.with_examples(unit[2:])  # the centre it was made with stays
    np.testing.assert_allclose(grown.weight, _normalised(unit.mean(0) - centre), atol=1e-6)
    assert AddedClass.from_dict(grown.to_dict()).weight.tolist() == grown.weight.tolist()
    classifier = Classifier(("a",), (added,), 0.05, "f")
    logits = np.asarray([[0.3 / 0.05]], np.float32)  # a trained row at cosine 0.3
    probabilities = classifier.probabilities(logits, unit[:1])
    cosine = float(unit[0] @ added.weight)
    assert probabilities[0, 1] / probabilities[0, 0] == pytest.approx(
        np.exp((cosine - 0.3) / 0.05), rel=1e-4
    )


def test_fitted_rows_give_the_trained_classes_their_images_back() -> None:
    """A new class drawn close to a trained one takes some of its images when imprinted; fitted
    on the collection it gives them back, still answers for its own examples, and stays near
    where imprinting put it. Kept with the classes; without labelled images of the trained
    classes there is nothing to keep, and the row stays imprinted."""
    rng = np.random.default_rng(0)
    axes = np.eye(16)
    near_a = _normalised(axes[0] + 1.2 * axes[2] + 0.25 * rng.normal(size=(40, 16)))
    near_b = _normalised(axes[1] + 0.25 * rng.normal(size=(40, 16)))
    examples = _normalised(axes[2] + 0.5 * axes[0] + 0.25 * rng.normal(size=(5, 16)))
    rows = axes[:2].astype(np.float32)
    trained = Classifier(("a", "b"), (), 0.05, "f", rows)
    imprinted = [added_from("c", examples, np.concatenate([near_a, near_b, examples]).mean(0))]
    labels = np.asarray(["a"] * 40 + ["b"] * 40, dtype=object)
    sample = np.concatenate([near_a, near_b]).astype(np.float32)
    fitted = trained.fitted(imprinted, labels, sample)

    def own_answers(added: list[AddedClass], images: np.ndarray) -> np.ndarray:
        classifier = trained.replaced(added)
        scores = classifier.probabilities(images @ rows.T / 0.05, images)
        return np.asarray(classifier.names)[scores.argmax(1)]

    before = (own_answers(imprinted, sample) == labels).mean()
    after = (own_answers(fitted, sample) == labels).mean()
    assert before < 0.95 and after > before + 0.04
    assert own_answers(fitted, examples.mean(0, keepdims=True)).tolist() == ["c"]
    assert float(fitted[0].weight @ imprinted[0].weight) > 0.95
    assert fitted[0].weight.tolist() != imprinted[0].weight.tolist()
    kept = AddedClass.from_dict(fitted[0].to_dict())
    assert kept.weight.tolist() == fitted[0].weight.tolist()
    assert trained.replaced([kept]).version == trained.replaced(fitted).version
    unlabelled = trained.fitted(fitted, np.asarray(["other"] * 80, dtype=object), sample)
    assert unlabelled[0].weight.tolist() == imprinted[0].weight.tolist()
    grown = fitted[0].with_examples(examples[:1])  # to be fitted again, from its new mean
    assert grown.fitted is None


def _normalised(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector, axis=-1, keepdims=True)


def test_neighbour_vote_shares() -> None:
    assert neighbour_vote(["a", "b", None, "a"], [0.5, 0.3, 0.9, 0.2]) == pytest.approx(
        {"a": 0.7, "b": 0.3}
    )
    assert neighbour_vote([None], [0.9]) == {}
    assert neighbour_vote(["a", "b"], [-0.1, -0.2]) == {"a": 0.5, "b": 0.5}


def test_the_cli_adds_lists_and_removes_classes_offline(
    bundle_dir: Path,
    shapes_dir: Path,
    serve: Callable[..., TestClient],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    examples = tmp_path / "noise"
    examples.mkdir()
    for seed in range(3):
        (examples / f"{seed}.png").write_bytes(noise_png(seed))
    (examples / "broken.png").write_bytes(b"not a png")
    model = ["--model", str(bundle_dir), "--workers", "0"]
    assert main(["classes", "add", "noise", str(examples), *model]) == 0
    assert "noise\tadded from 3 image(s)" in capsys.readouterr().out
    with serve() as client:  # the server started after it sees it
        assert client.get("/classes").json()["classes"][-1]["examples"] == 3
        assert classify(client, noise_png(1))["label"] == "noise"
    assert main(["classes", "add", "noise", str(shapes_dir / "star"), *model]) == 0  # more
    assert "noise\tadded from 13 image(s)" in capsys.readouterr().out

    assert main(["classes", "add", "circle", str(examples), *model]) == 2  # a trained class
    err = capsys.readouterr().err
    assert "already a class named 'circle'" in err and "Traceback" not in err
    assert main(["classes", "remove", "gone", *model]) == 2
    assert "no added class named 'gone'" in capsys.readouterr().err
    assert main(["classes", "remove", "noise", *model]) == 0
    assert main(["classes", "list", *model]) == 0
    listed = capsys.readouterr().out
    assert "noise" not in listed and "4 trained classes" in listed


def test_a_class_needs_images_in_the_collection_to_be_placed_against(
    trained_bundle_dir: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "bundle"
    directory.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained_bundle_dir / name, directory / name)
    settings = Settings(bundle_dir=directory, device="cpu")  # its collection: made on the first add
    with TestClient(create_app(settings)) as client:
        answer = client.post("/classes", data={"name": "a"}, files=files(noise_png(1)))
        assert answer.status_code == 409 and "add images first" in answer.json()["detail"]
        assert client.post("/images", files=files(noise_png(2))).status_code == 201
        added = client.post("/classes", data={"name": "a"}, files=files(noise_png(1)))
        assert added.status_code == 201
