"""Folders of labelled images: listing, checking, splitting, datasets and transforms."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

from models.backbones import Preprocessing
from models.errors import DatasetError, UnsupportedImage
from models.images import DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class."""

    path: Path
    label: int


def find_images(root: Path) -> list[Path]:
    """Every image file below root (by extension, hidden files skipped), sorted."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def label_of(path: Path, root: Path) -> str | None:
    """The class of an image: its top-level subfolder below root (None for files in root)."""
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None


def list_class_folders(
    root: Path, classes: list[str] | None = None
) -> tuple[list[str], list[Sample]]:
    """Classes (sorted subfolder names with images, or the given ones) and their images."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder. Pass a folder with one subfolder per class.")
    names = classes or sorted(
        p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    files = {name: find_images(root / name) for name in names}
    if classes is None:
        empty = [name for name in names if not files[name]]
        if empty:
            log.warning("class folders with no images are ignored: %s", ", ".join(empty))
        names = [name for name in names if files[name]]
    samples = [Sample(path, label) for label, name in enumerate(names) for path in files[name]]
    return names, samples


def check_images(
    paths: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Decode every file once; return the readable ones and (path, reason) for the others."""

    def reason(path: Path) -> str | None:
        try:
            load_image(path, max_pixels=max_pixels, draft_size=512)
        except UnsupportedImage as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(
            tqdm(pool.map(reason, paths), total=len(paths), desc="checking images", leave=False)
        )
    good = [path for path, why in zip(paths, reasons, strict=True) if why is None]
    bad = [(path, why) for path, why in zip(paths, reasons, strict=True) if why is not None]
    if bad:
        listing = "; ".join(f"{path} ({why})" for path, why in bad)
        log.warning("skipping %d unreadable image(s): %s", len(bad), listing)
    return good, bad


def split_samples(
    samples: Sequence[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded train/val split; a class with one image goes to train only."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(members)
        n_val = min(len(members) - 1, max(1, round(val_fraction * len(members))))
        val += members[:n_val]
        train += members[n_val:]
    return train, val


def load_splits(
    data_dir: Path, val_fraction: float = 0.2, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[str], list[Sample], list[Sample]]:
    """Classes, train and val samples: from train/ and val/ if present, else a seeded split."""
    presplit = (data_dir / "train").is_dir() and (data_dir / "val").is_dir()
    if presplit:
        classes, train = list_class_folders(data_dir / "train")
        _, val = list_class_folders(data_dir / "val", classes)
    else:
        classes, train = list_class_folders(data_dir)
        val = []
    if len(classes) < 2:
        raise DatasetError(
            f"{data_dir} has {len(classes)} class folder(s) with images; training needs at least "
            "two. Put each class's images in its own subfolder, e.g. DATA/cats/*.jpg and "
            "DATA/dogs/*.jpg."
        )
    good, _ = check_images([s.path for s in train + val], max_pixels=max_pixels)
    readable = set(good)
    train = [s for s in train if s.path in readable]
    val = [s for s in val if s.path in readable]
    if not presplit:
        train, val = split_samples(train, val_fraction, seed)
    return classes, train, val


def _interpolation(pre: Preprocessing) -> InterpolationMode:
    return InterpolationMode(pre.interpolation)


def train_transform(pre: Preprocessing) -> v2.Transform:
    """Standard augmentations: random resized crop, flip, colour jitter, then normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(
                pre.crop_size, scale=(0.35, 1.0), interpolation=_interpolation(pre)
            ),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def eval_transform(pre: Preprocessing) -> v2.Transform:
    """The weights' own inference transform: resize, centre crop, normalise."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(pre.resize_size, interpolation=_interpolation(pre), antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


class ImageDataset(Dataset):
    """Samples decoded with load_image and transformed; yields (tensor, label)."""

    def __init__(self, samples: Sequence[Sample], transform: v2.Transform, draft_size: int):
        self.samples = list(samples)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = load_image(sample.path, draft_size=self.draft_size)
        return self.transform(image), sample.label
