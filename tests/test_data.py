"""Listing, checking and splitting folders of labelled images."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from models.backbones import Preprocessing, preprocessing_for
from models.data import (
    check_images,
    find_images,
    label_of,
    list_class_folders,
    load_splits,
    split_samples,
)
from models.errors import DatasetError
from models.transforms import background_of, eval_transform, resized


def make_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / name / f"{i}.png")
    return root


def test_split_is_stratified_seeded_and_disjoint(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"a": 10, "b": 5, "c": 1})
    classes, train, val = load_splits(root, val_fraction=0.2, seed=3)
    assert classes == ["a", "b", "c"]
    assert Counter(s.label for s in val) == {0: 2, 1: 1}  # one-image class stays in train
    assert {s.path for s in train}.isdisjoint({s.path for s in val})
    assert len(train) + len(val) == 16
    assert load_splits(root, 0.2, seed=3)[2] == val
    assert load_splits(root, 0.2, seed=4)[2] != val


def test_existing_train_val_folders_are_used(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"x": 3, "y": 3})
    make_folder(tmp_path / "val", {"x": 1, "y": 2})
    classes, train, val = load_splits(tmp_path)
    assert classes == ["x", "y"] and len(train) == 6 and len(val) == 3
    assert all("val" in s.path.parts for s in val)


def test_bad_files_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path, {"a": 3, "b": 3})
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "b" / "text.jpg").write_bytes(b"not a jpeg")
    _, train, val = load_splits(root)
    paths = {str(s.path.relative_to(root)) for s in train + val}
    assert "a/empty.png" not in paths and "b/text.jpg" not in paths and len(paths) == 6
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1
    assert "empty.png" in warnings[0].getMessage() and "text.jpg" in warnings[0].getMessage()


def test_one_class_is_refused_with_advice(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"only": 4})
    with pytest.raises(DatasetError, match="at least two"):
        load_splits(root)


def test_find_images_and_labels_from_top_folder(tmp_path: Path) -> None:
    make_folder(tmp_path / "animals" / "birds", {"owl": 1})
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / ".hidden" / "x.png")
    (tmp_path / "notes.txt").write_text("hi")
    found = find_images(tmp_path)
    assert [label_of(p, tmp_path) for p in found] == ["animals"]


def test_check_images_reports_reasons(tmp_path: Path) -> None:
    good = tmp_path / "ok.png"
    Image.effect_noise((64, 64), 50).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:2000])
    readable, unreadable = check_images([good, bad])
    assert readable == [good]
    assert unreadable[0][0] == bad and "truncated" in unreadable[0][1]


def test_split_samples_keeps_every_sample() -> None:
    from models.data import Sample

    samples = [Sample(Path(f"{i}.png"), i % 3) for i in range(30)]
    train, val = split_samples(samples, 0.3, seed=0)
    assert sorted(map(str, [s.path for s in train + val])) == sorted(str(s.path) for s in samples)
    assert Counter(s.label for s in val) == {0: 3, 1: 3, 2: 3}


@pytest.mark.parametrize("layout", ["classes", "train-val"])
def test_one_rule_for_the_classes_of_a_folder(tmp_path: Path, layout: str) -> None:
    """Training, indexing and evaluation read the same classes from either layout."""
    if layout == "train-val":
        make_folder(tmp_path / "train", {"cats": 2, "dogs": 2})
        make_folder(tmp_path / "val", {"cats": 1, "dogs": 1})
    else:
        make_folder(tmp_path, {"cats": 3, "dogs": 3})
    classes, samples = list_class_folders(tmp_path)
    assert classes == ["cats", "dogs"] and len(samples) == 6
    assert {label_of(s.path, tmp_path) for s in samples} == {"cats", "dogs"}
    assert all(label_of(s.path, tmp_path) == classes[s.label] for s in samples)
    assert load_splits(tmp_path)[0] == classes


@pytest.mark.slow
def test_index_labels_a_train_val_folder_by_class(tmp_path: Path, trained_bundle_dir: Path) -> None:
    from app.stages import index_folder
    from index.gallery import GalleryIndex
    from models.bundle import Bundle

    make_folder(tmp_path / "photos" / "train", {"circle": 2, "square": 2})
    for name in ("circle", "square"):  # other content than train's, or it would be skipped
        (tmp_path / "photos" / "val" / name).mkdir(parents=True)
        colour = (0, 200, 0) if name == "circle" else (0, 0, 200)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "photos" / "val" / name / "v.png")
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    index_folder(tmp_path / "photos", bundle, tmp_path / "index", workers=0)
    gallery = GalleryIndex.load(tmp_path / "index", bundle.fingerprint)
    try:
        assert gallery.labels() == {"circle": 3, "square": 3}
    finally:
        gallery.close()


@pytest.mark.parametrize(
    ("crop", "size", "mean", "std"),
    [
        (224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet
        (224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # EfficientNet-Lite's
        (260, 293, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # an odd margin
        (224, 200, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # smaller: padded
    ],
)
def test_eval_transform_is_torchvisions_centre_crop_and_normalise(
    crop: int, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    """The one-pass inference transform gives the model the input torchvision's own transforms
    give it, so a query, the index and evaluation see what training's validation saw."""
    pre = Preprocessing(
        crop_size=crop, resize_size=size, mean=mean, std=std, interpolation="bilinear"
    )
    torchvisions = v2.Compose(
        [v2.CenterCrop(crop), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )
    pixels = torch.randint(0, 256, (3, size, size + 7), dtype=torch.uint8)
    ours = eval_transform(pre)(pixels)
    assert ours.dtype == torch.float32 and ours.shape == (3, crop, crop)
    torch.testing.assert_close(ours, torchvisions(pixels), rtol=0, atol=1e-5)


def _long_drawing() -> Image.Image:
    """A 6:1 strip on a light grey background, a black mark at each end."""
    image = Image.new("RGB", (600, 100), (230, 230, 230))
    for left in (0, 580):
        image.paste((0, 0, 0), (left, 30, left + 20, 70))
    return image


@pytest.mark.parametrize(
    ("fit", "ends_seen"), [("crop", False), ("letterbox", True), ("resize", True)]
)
def test_the_fit_decides_whether_a_long_drawing_keeps_its_ends(fit: str, ends_seen: bool) -> None:
    """What the network sees (the centre crop of the resized square) holds both black ends
    unless the image is centre-cropped; the margin is the drawing's own background."""
    pre = replace(preprocessing_for("efficientnet_lite0"), fit=fit)
    pixels = resized(_long_drawing(), pre)
    assert pixels.shape == (3, pre.resize_size, pre.resize_size) and pixels.dtype == torch.uint8
    seen = v2.functional.center_crop(pixels, [pre.crop_size])[0]
    dark_columns = (seen < 60).any(dim=0).nonzero().flatten()
    halves = (dark_columns < pre.crop_size // 2).any(), (dark_columns >= pre.crop_size // 2).any()
    assert all(halves) == ends_seen
    if fit == "letterbox":
        assert pixels[:, 0, 0].tolist() == [230, 230, 230]


def test_the_background_is_the_colour_of_the_border() -> None:
    pixels = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    pixels[:, 5:15, 5:25] = 0  # the drawing, away from the border
    pixels[:, 0, :3] = 7  # a little of it touching the border
    assert background_of(pixels).flatten().tolist() == [200, 200, 200]
