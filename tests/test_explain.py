"""POST /explain: Grad-CAM heatmaps land on the object that decided the answer.

The model: efficientnet_lite0's ImageNet trunk (installed with the package, no download) with a
two-class head trained here on synthetic scenes, a ring or a cross on a patch at a random place
over seeded, low-contrast noise. Only the object tells the classes apart, so the regions that
drive the class are the object's; a test image puts it somewhere known, and the hottest cell of
the heatmap must lie on it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw
from torch import nn

from app.main import create_app
from app.service import Service
from app.settings import Settings
from models.bundle import Bundle
from models.explain import Explainer, gap
from models.transforms import eval_transform, resized

SIDE, HALF = 224, 30  # scene size; half the side of the object's patch
CLASSES = ["ring", "cross"]
TRAINING_SCENES = 128


def scene(kind: str, centre: tuple[int, int], seed: int | None) -> Image.Image:
    """Seeded noise (flat grey without a seed) with a ring or a cross on a white patch centred
    at `centre`."""
    if seed is None:
        image = Image.new("RGB", (SIDE, SIDE), (200, 200, 200))
    else:
        noise = np.random.default_rng(seed).integers(60, 196, (SIDE // 8, SIDE // 8, 3), np.uint8)
        image = Image.fromarray(noise).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    draw, (x, y) = ImageDraw.Draw(image), centre
    draw.rectangle([x - HALF, y - HALF, x + HALF, y + HALF], fill="white")
    if kind == "ring":
        draw.ellipse([x - 22, y - 22, x + 22, y + 22], outline="black", width=8)
    else:
        draw.rectangle([x - 22, y - 5, x + 22, y + 5], fill="black")
        draw.rectangle([x - 5, y - 22, x + 5, y + 22], fill="black")
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    """efficientnet_lite0's ImageNet trunk with a ring-or-cross head trained on 128 scenes."""
    bundle = Bundle.pretrained("efficientnet_lite0", "imagenet", "cpu")
    # The scenes' positions and heat ratios were set with the centre crop (a letterbox shows
    # the whole 224-px scene: tests/test_bundle.py checks /explain follows the bundle's fit).
    pre = replace(bundle.config.preprocessing, fit="crop")
    bundle.config = replace(bundle.config, preprocessing=pre)
    rng = np.random.default_rng(0)
    images, targets = [], []
    for i in range(TRAINING_SCENES):
        centre = tuple(int(v) for v in rng.integers(HALF, SIDE - HALF, 2))
        images.append(scene(CLASSES[i % 2], centre, seed=1000 + i))
        targets.append(i % 2)
    pre = bundle.config.preprocessing
    x = torch.stack([eval_transform(pre)(resized(image, pre)) for image in images])
    with torch.no_grad():
        features = bundle.net.head(bundle.net.trunk(x)[0])
    torch.manual_seed(0)
    head = nn.Linear(features.shape[1], 2)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.1)
    y = torch.tensor(targets)
    for _ in range(200):
        optimiser.zero_grad()
        nn.functional.cross_entropy(head(features), y).backward()
        optimiser.step()
    assert (head(features).argmax(1) == y).all()  # it tells rings from crosses
    bundle.net.classifier = head
    bundle.config.classes = CLASSES
    return bundle


@pytest.fixture(scope="module")
def client(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    index_dir = tmp_path_factory.mktemp("explain") / "index"
    settings = Settings(index_dir=index_dir, device="cpu")
    with TestClient(create_app(settings, Service(settings, bundle, None))) as client:
        yield client


CELL = 32  # the trunk's stride: the heat is a 7 x 7 grid of 32-px cells, scaled up smoothly


def on_object(grey: np.ndarray, centre: tuple[int, int], min_ratio: float = 2.0) -> bool:
    """Whether the hottest cell overlaps the object's patch, and the patch's mean heat is at
    least min_ratio times the rest's."""
    cells = grey[CELL // 2 :: CELL, CELL // 2 :: CELL]  # each cell's centre
    row, column = np.unravel_index(int(cells.argmax()), cells.shape)
    (x, y), spans = centre, lambda start, c: start < c + HALF and start + CELL > c - HALF
    rows, columns = np.mgrid[: grey.shape[0], : grey.shape[1]]
    patch = (abs(columns - x) <= HALF) & (abs(rows - y) <= HALF)
    ratio = grey[patch].mean() / max(grey[~patch].mean(), 1e-6)
    return spans(CELL * column, x) and spans(CELL * row, y) and ratio >= min_ratio


CENTRES = [(50, 50), (174, 50), (50, 174), (174, 174), (112, 112), (70, 150), (100, 40)]


@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("centre", CENTRES)
def test_the_class_heatmap_is_hottest_on_the_object(
    client: TestClient, centre: tuple[int, int], kind: str
) -> None:
    response = client.post(
        "/explain?style=heat", files={"file": ("q.png", png(scene(kind, centre, seed=7)))}
    )
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-imgsim-label"] == kind
    grey = np.asarray(Image.open(io.BytesIO(response.content)))
    assert grey.shape == (SIDE, SIDE)
    assert on_object(grey, centre)


def test_the_overlay_is_a_colour_png_of_what_the_model_sees(client: TestClient) -> None:
    data = png(scene("ring", (60, 60), seed=3))
    response = client.post("/explain", files={"file": ("q.png", data)})
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.format == "PNG" and overlay.mode == "RGB" and overlay.size == (SIDE, SIDE)
    response = client.post("/explain?label=cross", files={"file": ("q.png", data)})
    assert response.status_code == 200 and response.headers["x-imgsim-label"] == "cross"


@pytest.mark.parametrize(
    ("kind", "query_at", "stored_at"),
    [("ring", (60, 170), (170, 60)), ("cross", (60, 60), (170, 170))],
)
def test_the_similarity_heatmaps_are_hottest_on_the_shared_object(
    client: TestClient, kind: str, query_at: tuple[int, int], stored_at: tuple[int, int]
) -> None:
    # On flat backgrounds only the objects carry content: that is what the two share.
    stored = png(scene(kind, stored_at, seed=None))
    neighbour = client.post("/images", files={"files": ("n.png", stored)}).json()["images"][0]
    response = client.post(
        f"/explain?neighbour_id={neighbour['id']}&style=heat",
        files={"file": ("q.png", png(scene(kind, query_at, seed=None)))},
    )
    assert response.status_code == 200 and -1 <= float(response.headers["x-imgsim-score"]) <= 1
    grey = np.asarray(Image.open(io.BytesIO(response.content)))
    assert grey.shape == (SIDE, 2 * SIDE + gap(SIDE))
    assert on_object(grey[:, :SIDE], query_at, min_ratio=1.25)
    assert on_object(grey[:, SIDE + gap(SIDE) :], stored_at, min_ratio=1.25)


def test_bad_explain_requests_are_4xx(client: TestClient) -> None:
    data = png(scene("ring", (60, 60), seed=3))
    response = client.post("/explain?label=zebra", files={"file": ("q.png", data)})
    assert response.status_code == 422 and "no class 'zebra'" in response.json()["detail"]
    response = client.post("/explain?neighbour_id=999", files={"file": ("q.png", data)})
    assert response.status_code == 404 and response.json()["detail"].startswith("there is no")
    response = client.post("/explain", files={"file": ("q.png", b"not an image")})
    assert response.status_code == 422


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet18", "densenet121", "googlenet", "efficientnet_lite0"])
def test_every_backbone_family_is_explained(backbone: str) -> None:
    explainer = Explainer(Bundle.pretrained(backbone, "none", "cpu"))
    image = scene("ring", (60, 60), seed=5)
    heatmap, index = explainer.for_class(image)
    assert heatmap.heat.shape == (SIDE, SIDE) and np.isfinite(heatmap.heat).all()
    assert 0 <= index < 1000 and heatmap.overlay().size == (SIDE, SIDE)
    query, other, score = explainer.for_pair(image, scene("cross", (150, 150), seed=6))
    assert query.heat.shape == other.heat.shape == (SIDE, SIDE) and -1 <= score <= 1
