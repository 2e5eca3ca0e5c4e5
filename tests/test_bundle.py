"""Bundles save and load themselves, and know exactly which weights they hold."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models.bundle import Bundle
from models.errors import BundleError
from models.explain import Explainer
from models.transforms import eval_transform, resized


@pytest.fixture
def images(shapes_dir: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(shapes_dir.rglob("*.png"))[:5]]


def test_reload_gives_the_same_embeddings(
    trained_bundle_dir: Path, images: list[Image.Image]
) -> None:
    first = Bundle.load(trained_bundle_dir, "cpu")
    second = Bundle.load(trained_bundle_dir, "cpu")
    assert first.fingerprint == second.fingerprint
    np.testing.assert_allclose(first.embed(images), second.embed(images), atol=1e-6)
    config = json.loads((trained_bundle_dir / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["embed_dim"] == 32
    assert config["classes"] == ["circle", "square", "star", "triangle"]
    assert config["preprocessing"]["crop_size"] == 64  # --image-size, stored with the bundle
    assert config["preprocessing"]["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_embed_one_or_many(trained_bundle_dir: Path, images: list[Image.Image]) -> None:
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    many = bundle.embed(images, batch_size=2)
    one = bundle.embed(images[0])
    assert many.dtype == np.float32 and many.shape == (5, 32) and one.shape == (1, 32)
    np.testing.assert_allclose(one[0], many[0], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1.0, atol=1e-5)
    probabilities, _ = bundle.classify(images)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_files_and_decoded_images_embed_alike(trained_bundle_dir: Path, shapes_dir: Path) -> None:
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    paths = sorted(shapes_dir.rglob("*.png"))[:3]
    from_files = bundle.embed(paths, batch_size=2, workers=1)
    from_images = bundle.embed([Image.open(p).convert("RGB") for p in paths])
    np.testing.assert_allclose(from_files, from_images, atol=1e-5)


def test_changed_weights_are_detected(trained_bundle_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(trained_bundle_dir, copy)
    state = load_file(str(copy / "model.safetensors"))
    name = next(iter(state))
    state[name] = state[name] + 1
    save_file(state, str(copy / "model.safetensors"))
    with pytest.raises(BundleError, match="has changed"):
        Bundle.load(copy, "cpu")


def test_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="imgsim train"):
        Bundle.load(tmp_path, "cpu")


def test_training_metrics_are_recorded(trained_bundle_dir: Path) -> None:
    history = json.loads((trained_bundle_dir / "metrics.json").read_text())
    assert [h["phase"] for h in history] == ["probe", "warmup", "finetune"]
    for record in history:
        assert record["val_loss"] > 0 and 0 <= record["val_top1"] <= 1 and record["seconds"] > 0


def test_every_stage_fits_the_image_as_the_bundle_says(
    untrained_bundle: Callable[[Path], Path], tmp_path: Path
) -> None:
    """A letterbox bundle: the server's preprocessing, the batches of index and eval, and the
    input /explain makes are one tensor, and not the centre crop's."""
    directory = untrained_bundle(tmp_path / "bundle")
    config = json.loads((directory / "config.json").read_text())
    config["preprocessing"]["fit"] = "letterbox"
    (directory / "config.json").unlink()  # a hard link to the shared copy: not written through
    (directory / "config.json").write_text(json.dumps(config))
    bundle = Bundle.load(directory, "cpu")
    image = Image.new("RGB", (600, 100), "white")
    image.paste((0, 0, 0), (0, 30, 20, 70))  # a mark at the far left, which a crop cuts off
    served = bundle.preprocess(image)
    batch, _ = next(bundle.batches([image]))
    explained, _ = Explainer(bundle)._inputs(image)
    assert torch.equal(batch[0], served) and torch.allclose(explained[0], served)
    cropped = replace(bundle.config.preprocessing, fit="crop")
    assert not torch.allclose(eval_transform(cropped)(resized(image, cropped)), served)
