"""Shared fixtures: a small generated dataset and one tiny trained bundle for the session, and
(tests/postgres.py) a PostgreSQL server for the tests of that item store."""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torchvision.models import get_model

from models.backbones import imagenet_checkpoint_path
from models.bundle import Bundle
from models.samples import make_sample_dataset
from models.training import TrainConfig, train

pytest_plugins = ["tests.postgres"]  # its fixtures: postgres, postgres_url, database

TINY = {"backbone": "resnet18", "weights": "none", "device": "cpu", "workers": 0}
SIZE = 64  # the shapes are drawn at this size, and the session bundle trains and serves at it


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Exports made outside a bundle folder go to a temporary imgsim cache, not the user's
    (servers started by the tests inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMGSIM_CACHE_DIR", str(tmp_path_factory.mktemp("imgsim-cache")))
        yield


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reaches the network: a download fails as it does offline."""

    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(f"offline test: not downloading {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


@pytest.fixture
def cached_resnet18(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """A seeded resnet18 saved where torchvision's cache keeps its ImageNet weights, under a
    temporary TORCH_HOME: the offline 'imagenet' path loads it. Returns the model saved."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = imagenet_checkpoint_path("resnet18")
    assert path.parent == tmp_path / "torch" / "hub" / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = get_model("resnet18", weights=None).eval()
    torch.save(reference.state_dict(), path)
    return reference


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of generated shapes, 10 images each."""
    return make_sample_dataset(tmp_path_factory.mktemp("shapes"), per_class=10, size=SIZE)


@pytest.fixture(scope="session")
def trained_bundle_dir(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A resnet18 bundle trained for two short epochs on the shapes (no pretrained weights)."""
    out = tmp_path_factory.mktemp("bundle")
    config = TrainConfig(
        **TINY, epochs=2, warmup_epochs=1, batch_size=8, embed_dim=32, seed=0, image_size=SIZE
    )
    train(shapes_dir, out, config)
    return out


@pytest.fixture(scope="session")
def _untrained_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("untrained")
    Bundle.pretrained("resnet18", "none", "cpu").save(directory)
    return directory


@pytest.fixture
def untrained_bundle(_untrained_bundle_dir: Path) -> Callable[[Path], Path]:
    """Makes a private copy (hard links) of one saved random-init resnet18 ImageNet bundle at
    a folder, with no index yet: fast to load, for tests of the service rather than the model."""

    def copy(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for file in _untrained_bundle_dir.iterdir():
            if file.is_file():
                os.link(file, directory / file.name)
        return directory

    return copy
