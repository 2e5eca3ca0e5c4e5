"""Training extras: resume after an interruption, --init-from, the calibrated "unknown" answer."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from app.main import create_app
from app.service import Service
from app.settings import Settings
from models.backbones import preprocessing_for
from models.bundle import Bundle, BundleConfig
from models.data import load_splits
from models.images import load_image
from models.layout import BundleLayout
from models.metrics import MIN_COVERAGE, choose_threshold
from models.network import build_net
from models.samples import make_sample_dataset
from models.training import TrainConfig, train

TINY = TrainConfig(
    backbone="resnet18",
    weights="none",
    epochs=2,
    warmup_epochs=1,
    batch_size=4,
    image_size=32,
    device="cpu",
    workers=0,
    target_precision=0.5,
)


class Interrupted(Exception):
    """Stands in for a crash or a kill between epochs."""


def _two_classes(root: Path, shapes: tuple[str, str] = ("circle", "square")) -> Path:
    data = make_sample_dataset(root / "all", per_class=5, size=48)
    keep = root / "-".join(shapes)
    keep.mkdir()
    for shape in shapes:
        (data / shape).rename(keep / shape)
    return keep


def _interrupt_after(stop: int):
    def hook(epoch: int) -> None:
        if epoch == stop:
            raise Interrupted

    return hook


@pytest.mark.slow
def test_resume_after_interruption_gives_the_same_bundle(tmp_path: Path) -> None:
    """Exact: every random draw of an epoch is seeded from (seed, rank, epoch), so a resumed
    CPU run with workers=0 reproduces the uninterrupted weights bit for bit (torch.equal)."""
    data = _two_classes(tmp_path)
    whole = train(data, tmp_path / "whole", TINY)
    with pytest.raises(Interrupted):
        train(data, tmp_path / "cut", TINY, on_epoch_end=_interrupt_after(1))
    cut = BundleLayout(tmp_path / "cut")
    assert cut.checkpoint.is_file()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    resumed = train(data, tmp_path / "cut", TINY, resume=True)

    expected = load_file(tmp_path / "whole" / "model.safetensors")
    got = load_file(tmp_path / "cut" / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert resumed.fingerprint == whole.fingerprint
    assert resumed.config.threshold == whole.config.threshold
    assert not cut.checkpoint.exists()  # removed once the bundle is saved
    epochs = cut.metrics.read_text().count('"epoch"')
    assert epochs == TINY.epochs + 1  # the probe of LP-FT is recorded as epoch 0


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path) -> None:
    data = _two_classes(tmp_path)
    with pytest.raises(Interrupted):
        train(data, tmp_path / "b", TINY, on_epoch_end=_interrupt_after(1))
    with pytest.raises(ValueError, match="other settings"):
        train(data, tmp_path / "b", replace(TINY, lr=0.5), resume=True)


@pytest.mark.slow
def test_threshold_is_calibrated_on_the_val_split(tmp_path: Path) -> None:
    data = _two_classes(tmp_path)
    bundle = train(data, tmp_path / "b", replace(TINY, epochs=1))
    classes, _, val = load_splits(data, TINY.val_fraction, TINY.seed)
    loaded = Bundle.load(tmp_path / "b", "cpu")
    probabilities, _ = loaded.classify([load_image(s.path) for s in val])
    labels = np.array([s.label for s in val])
    expected = choose_threshold(
        probabilities.max(axis=1), probabilities.argmax(axis=1) == labels, TINY.target_precision
    )
    assert loaded.config.threshold == pytest.approx(expected.threshold, abs=1e-5)
    assert loaded.config.threshold == bundle.config.threshold
    assert loaded.config.extra["threshold_target_precision"] == TINY.target_precision
    # The split is too small to calibrate a precision: it still answers most val images.
    kept = loaded.config.extra["unknown_threshold"]
    assert "too few" in kept["rule"] and kept["coverage"] >= MIN_COVERAGE
    history = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [r["unknown_threshold"] for r in history if "unknown_threshold" in r] == [kept]


@pytest.mark.slow
def test_init_from_keeps_the_trunk_and_takes_the_new_classes(tmp_path: Path) -> None:
    first = train(_two_classes(tmp_path / "a"), tmp_path / "first", replace(TINY, epochs=1))
    target = _two_classes(tmp_path / "b", ("triangle", "star"))
    # Warm-up only: the trunk is frozen (and its BatchNorm in eval mode), so it must come out
    # exactly as the first bundle's; the classifier is new and sized for the new classes.
    config = replace(TINY, epochs=1, backbone="resnet34", init_from=str(tmp_path / "first"))
    second = train(target, tmp_path / "second", config)
    assert second.config.classes == ["star", "triangle"]
    assert second.config.backbone == "resnet18"  # the source bundle's, not the config's
    assert second.config.weights == f"bundle {first.fingerprint}"
    assert second.config.preprocessing == first.config.preprocessing
    source, trained = first.net.trunk.state_dict(), second.net.trunk.state_dict()
    assert all(torch.equal(source[name], trained[name]) for name in source)
    assert second.net.classifier.weight.shape == (2, first.embedding_dim)
    assert not torch.equal(second.net.classifier.weight, first.net.classifier.weight)


def _random_bundle(threshold: float | None) -> Bundle:
    torch.manual_seed(0)
    pre = replace(preprocessing_for("resnet18"), crop_size=32, resize_size=36)
    classes = ["circle", "square", "star"]
    # temperature 1: probabilities stay well inside (0, 1), so a threshold just above fits
    config = BundleConfig(
        "resnet18", classes, pre, weights="none", temperature=1.0, threshold=threshold
    )
    return Bundle(config, build_net("resnet18", len(classes), "none", temperature=1.0), "cpu")


def _post(client: TestClient, query: str = "") -> dict:
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    files = {"file": ("x.png", buffer.getvalue(), "image/png")}
    response = client.post(f"/classify?top_k=2{query}", files=files)
    assert response.status_code == 200, response.text
    return response.json()


def test_classify_answers_unknown_below_the_threshold() -> None:
    with TestClient(create_app(Settings(), Service(Settings(), _random_bundle(None), None))) as c:
        top = _post(c)
    assert top["unknown"] is False and top["threshold"] is None
    score = top["predictions"][0]["score"]
    assert top["label"] == top["predictions"][0]["label"]

    above = score + 1e-3
    bundle = _random_bundle(above)
    with TestClient(create_app(Settings(), Service(Settings(), bundle, None))) as client:
        stored = _post(client)
        assert stored["label"] == "unknown" and stored["unknown"] is True
        assert stored["threshold"] == pytest.approx(above)
        assert [p["label"] for p in stored["predictions"]] == [
            p["label"] for p in top["predictions"]
        ]
        override = _post(client, f"&threshold={score - 1e-3}")
        assert override["label"] == top["label"] and override["unknown"] is False
        assert client.post("/classify?threshold=1.5", files={"file": b"x"}).status_code == 422


def test_trunk_share_keeps_the_layers_nearest_the_input(tmp_path: Path) -> None:
    """--trunk-share 0.5: fine-tuning moves the half of the trunk nearest the output; the half
    nearest the input keeps the weights it started from."""
    data = _two_classes(tmp_path / "a")
    first = train(data, tmp_path / "first", replace(TINY, epochs=1))
    config = replace(
        TINY,
        epochs=1,
        warmup_epochs=0,
        probe=False,
        trunk_share=0.5,
        init_from=str(tmp_path / "first"),
    )
    second = train(data, tmp_path / "second", config)
    before, after = list(first.net.trunk.parameters()), list(second.net.trunk.parameters())
    kept = len(before) - round(0.5 * len(before))  # as the trainer counts
    assert all(torch.equal(a, b) for a, b in zip(before[:kept], after[:kept], strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(before[kept:], after[kept:], strict=True))
