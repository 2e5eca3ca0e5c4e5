"""The one registry of backbones: name -> torchvision builder, weights and trunk."""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights
from torchvision.models._api import WeightsEnum

from models.errors import WeightsUnavailable

log = logging.getLogger(__name__)

# name -> family; the family says how to cut the torchvision model into a trunk.
BACKBONES: dict[str, str] = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "resnet101": "resnet",
    "resnet152": "resnet",
    "resnext50_32x4d": "resnet",
    "resnext101_32x8d": "resnet",
    "densenet121": "densenet",
    "densenet169": "densenet",
    "densenet201": "densenet",
    "googlenet": "googlenet",
}
DEFAULT_BACKBONE = "densenet121"

# Old DenseNet checkpoints name layers 'norm.1'; torchvision renames them on load.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the tensor the weights expect (read from torchvision's weights)."""

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


def check_backbone(name: str) -> str:
    """Return name if it is a known backbone, else raise ValueError listing the valid ones."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return name


def imagenet_weights(name: str) -> WeightsEnum:
    """torchvision's default ImageNet weights enum member for this backbone."""
    return get_model_weights(check_backbone(name)).DEFAULT


def preprocessing_for(name: str) -> Preprocessing:
    """Image size, mean, std and interpolation of the backbone's ImageNet weights."""
    transform = imagenet_weights(name).transforms()
    return Preprocessing(
        crop_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        mean=tuple(transform.mean),
        std=tuple(transform.std),
        interpolation=transform.interpolation.value,
    )


def imagenet_checkpoint_path(name: str) -> Path:
    """Where torchvision's cache keeps (or would keep) the ImageNet weights file."""
    url = imagenet_weights(name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def build_torchvision_model(name: str, weights: str | Path = "imagenet") -> nn.Module:
    """Build the full torchvision model with 'imagenet', 'none' or a state-dict file's weights."""
    check_backbone(name)
    # GoogLeNet keeps its auxiliary classifiers (they join the training loss) and always takes
    # ImageNet-normalised input, as its pretrained weights expect.
    extra = {"aux_logits": True, "transform_input": True} if BACKBONES[name] == "googlenet" else {}
    if weights == "imagenet":
        return _load_imagenet(name, extra)
    if extra:
        extra["init_weights"] = True
    if weights == "none":
        return get_model(name, weights=None, **extra)
    return _load_state_dict_file(name, Path(weights), extra)


def _load_imagenet(name: str, extra: dict) -> nn.Module:
    weights = imagenet_weights(name)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="auxiliary heads in the pretrained googlenet")
            return get_model(name, weights=weights, **extra)
    except (OSError, RuntimeError) as err:
        path = imagenet_checkpoint_path(name)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)
        raise WeightsUnavailable(
            f"The ImageNet weights for {name} are not in the torchvision cache and could not be "
            f"downloaded ({err}). Download {weights.url} on a machine that is online and put it "
            f"at {path} (set TORCH_HOME to use another cache folder), or run with "
            "'--weights none' to train from scratch, or '--weights PATH' to use a state-dict file."
        ) from err


def _load_state_dict_file(name: str, path: Path, extra: dict) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailable(
            f"--weights {path}: no such file. Pass 'imagenet', 'none' or the path of a "
            f"{name} state-dict file."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad or unsafe file
        raise WeightsUnavailable(
            f"--weights {path} could not be read as a state dict ({err}). Pass a file saved with "
            f"torch.save(model.state_dict()) for a torchvision {name}."
        ) from err
    state = {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}
    model = get_model(name, weights=None, **extra)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("aux")]  # GoogLeNet aux: trained anew
    if missing or unexpected:
        raise WeightsUnavailable(
            f"--weights {path} does not fit a torchvision {name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )
    return model
