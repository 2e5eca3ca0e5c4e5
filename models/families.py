"""Backbone families: how to build each family's architectures and cut them into a trunk
(image -> feature map) and its ImageNet classifier. The registry (`models.backbones`) names a
family for each backbone."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models import get_model
from torchvision.models._api import WeightsEnum

from models.errors import WeightsUnavailable

FeatureFn = Callable[[nn.Module, Tensor], tuple[Tensor, list[Tensor]]]


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
    # The trunk body's last convolutional stage, whose activations Grad-CAM weighs.
    cam_layer: Callable[[nn.Module], nn.Module] = lambda body: body[-1]  # noqa: E731


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
    _torchvision,
    _densenet_cut,
    lambda model: model.classifier.in_features,
    convert=_densenet_keys,
    cam_layer=lambda body: body[0],  # features (ends in norm5); body[1] is an in-place ReLU
)
GOOGLENET = Family(
    _googlenet_build,
    _googlenet_cut,
    lambda model: model.fc.in_features,
    features=_googlenet_features,
    adapt=_googlenet_adapt,
    cam_layer=lambda body: body.inception5b,
)
EFFICIENTNET_LITE = Family(
    _timm_build,
    _timm_cut,
    lambda model: model.num_features,
    features=lambda body, x: (body.forward_features(x), []),
    convert=_in_order,
    cam_layer=lambda body: body.bn2,  # conv_head's batch norm and activation
)
