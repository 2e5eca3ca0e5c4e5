"""Folders of labelled images: listing, checking, labelling, splitting, and the datasets that
read them (through models/transforms.py, the one decode -> resize -> crop policy)."""

from __future__ import annotations

import logging
import random
import stat
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL.Image import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from models.backbones import Preprocessing
from models.errors import DatasetError, UnsupportedImage
from models.images import DEFAULT_MAX_PIXELS, load_image
from models.transforms import Transform, decode, resized

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    """One image file and the index of its class."""

    path: Path
    label: int


def find_images(root: Path) -> list[Path]:
    """Every image file below root (by extension, hidden files skipped), sorted; what has an
    image's name but is not a file (a broken link, a FIFO, a device) is skipped with a warning."""
    found, skipped = scan_images(root)
    if skipped:
        log.warning("skipping %d entries that are not files: %s", len(skipped), listing(skipped))
    return found


def scan_images(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files below root (by extension, hidden ones left out), sorted, and
    (path, reason) for each entry with an image's name that is not a regular file or a
    symbolic link to one: reading a FIFO would wait forever, a device would never end."""
    found, skipped = [], []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or any(
            part.startswith(".") for part in path.relative_to(root).parts
        ):
            continue
        why = _not_a_file(path)
        if why is None:
            found.append(path)
        elif why:
            skipped.append((path, why))
    return found, skipped


SPECIAL_FILES = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _not_a_file(path: Path) -> str | None:
    """None for a regular file (or a link to one), '' for a folder, else what it is."""
    link = "a symbolic link to " if path.is_symlink() else ""
    try:
        mode = path.stat().st_mode  # follows links
    except FileNotFoundError:
        return "a broken symbolic link" if link else "removed while listing"
    except OSError as err:  # a link loop, a permission
        what = "a symbolic link that" if link else "an entry that"
        return f"{what} cannot be followed ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return ""
    return f"{link}{SPECIAL_FILES.get(stat.S_IFMT(mode), 'a special file')}, not a regular file"


def listing(problems: Sequence[tuple[Path, str]]) -> str:
    """'path (reason); ...': how skipped files are listed in warnings and errors."""
    return "; ".join(f"{path} ({why})" for path, why in problems)


SPLIT_FOLDERS = ("train", "val")


def is_split(root: Path) -> bool:
    """The train/val layout: root/train/<class>/... and root/val/<class>/..."""
    return all((root / name).is_dir() for name in SPLIT_FOLDERS)


def label_of(path: Path, root: Path) -> str | None:
    """The class of an image: its class folder, the top-level subfolder below root (below
    root/train or root/val in the train/val layout); None for a file outside any class folder.
    The one rule for training, indexing and evaluation."""
    return label_of_parts(path.relative_to(root).parts, is_split(root))


def label_of_parts(parts: Sequence[str], split: bool) -> str | None:
    """label_of for a path given as its parts below root (a local or a remote one), where split
    says whether root has the train/val layout."""
    if parts and parts[0] in SPLIT_FOLDERS and split:
        parts = parts[1:]
    return parts[0] if len(parts) > 1 else None


def list_class_folders(
    root: Path, classes: list[str] | None = None
) -> tuple[list[str], list[Sample]]:
    """Classes (sorted class folders with images, or the given ones) and their images; in the
    train/val layout, the classes of train/ and the images of both."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder. Pass a folder with one subfolder per class.")
    if is_split(root):
        classes, train = _class_folders(root / "train", classes)
        return classes, train + _class_folders(root / "val", classes)[1]
    return _class_folders(root, classes)


def _class_folders(root: Path, classes: list[str] | None) -> tuple[list[str], list[Sample]]:
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
        futures = [pool.submit(reason, path) for path in paths]
        # Counted as each check ends, not in order: one huge scan does not hold the count.
        done = as_completed(futures)
        for _ in tqdm(done, total=len(paths), desc="checking images", unit="image"):
            pass
    reasons = [future.result() for future in futures]
    good = [path for path, why in zip(paths, reasons, strict=True) if why is None]
    bad = [(path, why) for path, why in zip(paths, reasons, strict=True) if why is not None]
    if bad:
        log.warning("skipping %d unreadable image(s): %s", len(bad), listing(bad))
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
    presplit = is_split(data_dir)
    if presplit:
        classes, train = _class_folders(data_dir / "train", None)
        _, val = _class_folders(data_dir / "val", classes)
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


Source = Path | bytes | Image


class ImageDataset(Dataset):
    """Images (files, bytes or decoded) decoded and resized once, then transformed: yields
    (tensor, label). With a cache folder, each file's resized pixels are kept on disk in a
    uint8 memmap, so every later epoch reads them instead of decoding again."""

    def __init__(
        self,
        sources: Sequence[Source],
        pre: Preprocessing,
        transform: Transform,
        labels: Sequence[int] | None = None,
        cache: Path | None = None,
    ):
        self.sources = list(sources)
        self.labels = list(labels) if labels is not None else [0] * len(self.sources)
        self.pre, self.transform = pre, transform
        self.cache = DecodedCache(cache, len(self.sources), pre.resize_size) if cache else None

    @classmethod
    def of_samples(cls, samples: Sequence[Sample], pre: Preprocessing, transform: Transform,
                   cache: Path | None = None) -> ImageDataset:  # fmt: skip
        """A dataset over (path, label) samples."""
        return cls([s.path for s in samples], pre, transform, [s.label for s in samples], cache)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pixels(index)), self.labels[index]

    def pixels(self, index: int) -> torch.Tensor:
        """The resized uint8 image, from the cache when it holds it."""
        if self.cache is not None and self.cache.holds(index):
            return self.cache.get(index)
        source = self.sources[index]
        image = source if isinstance(source, Image) else decode(source, self.pre)
        pixels = resized(image, self.pre)
        if self.cache is not None:
            self.cache.put(index, pixels)
        return pixels


class Readable(Dataset):
    """A dataset's items as (tensor, label, reason): an image that cannot be decoded yields a
    blank tensor and the reason instead of raising, so one bad file does not stop a batch."""

    def __init__(self, dataset: ImageDataset, crop_size: int):
        self.dataset, self.crop_size = dataset, crop_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            return (*self.dataset[index], "")
        except UnsupportedImage as err:
            return torch.zeros(3, self.crop_size, self.crop_size), -1, str(err) or "unreadable"


class DecodedCache:
    """Resized uint8 images in a memmap file (N, 3, S, S) plus a 'filled' flag per row.

    Opened lazily in each process, so DataLoader workers (fork or spawn) share the file; a
    worker writes a row's pixels before its flag, so a set flag always means a whole row.
    """

    def __init__(self, folder: Path, count: int, size: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.pixels_file, self.flags_file = folder / "pixels.u8", folder / "filled.u8"
        self.shape = (count, 3, size, size)
        for path, length in ((self.pixels_file, count * 3 * size * size), (self.flags_file, count)):
            with open(path, "wb") as file:
                file.truncate(max(length, 1))  # sparse: disk is used as rows are filled
        self._arrays: tuple[np.memmap, np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._arrays is None:
            pixels = np.memmap(self.pixels_file, np.uint8, "r+", shape=self.shape)
            flags = np.memmap(self.flags_file, np.uint8, "r+", shape=(self.shape[0],))
            self._arrays = (pixels, flags)
        return self._arrays

    def holds(self, index: int) -> bool:
        """Whether row index is filled."""
        return bool(self._open()[1][index])

    def get(self, index: int) -> torch.Tensor:
        """Row index as a (3, S, S) uint8 tensor."""
        return torch.from_numpy(np.array(self._open()[0][index]))

    def put(self, index: int, pixels: torch.Tensor) -> None:
        """Fill row index."""
        rows, flags = self._open()
        rows[index] = pixels.numpy()
        flags[index] = 1
