"""Embedding model: backbone trunk -> GAP -> optional projection -> L2 norm; classifier on top."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import BACKBONES, build_torchvision_model, check_backbone

HEADS = ("cosine", "linear")
DEFAULT_TEMPERATURE = 0.05  # Zhai & Wu (BMVC 2019): normalised softmax with temperature 0.05


@dataclass
class NetOutput:
    """What one forward pass yields."""

    embedding: Tensor  # L2-normalised, (N, D)
    logits: Tensor  # (N, C)
    aux_logits: list[Tensor]  # GoogLeNet's auxiliary classifiers in training mode, else empty


class Trunk(nn.Module):
    """The convolutional part of a torchvision classifier: image -> feature map."""

    def __init__(self, model: nn.Module, family: str):
        super().__init__()
        self.family = family
        if family == "resnet":
            self.body = nn.Sequential(
                model.conv1,
                model.bn1,
                model.relu,
                model.maxpool,
                model.layer1,
                model.layer2,
                model.layer3,
                model.layer4,
            )
        elif family == "densenet":
            self.body = nn.Sequential(model.features, nn.ReLU(inplace=True))
        else:
            self.body = model  # GoogLeNet: its stages are called one by one in forward
            del model.avgpool, model.dropout, model.fc

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Feature map (N, F, h, w) and any auxiliary logits."""
        if self.family != "googlenet":
            return self.body(x), []
        return _googlenet_features(self.body, x)


def _googlenet_features(net: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    x = net._transform_input(x)
    x = net.maxpool2(net.conv3(net.conv2(net.maxpool1(net.conv1(x)))))
    x = net.maxpool3(net.inception3b(net.inception3a(x)))
    x = net.inception4a(x)
    aux = [net.aux1(x)] if net.training else []
    x = net.inception4d(net.inception4c(net.inception4b(x)))
    if net.training:
        aux.append(net.aux2(x))
    x = net.inception5b(net.inception5a(net.maxpool4(net.inception4e(x))))
    return x, aux


class EmbeddingHead(nn.Module):
    """Global average pooling, then an optional linear projection."""

    def __init__(self, in_dim: int, embed_dim: int | None):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.projection = nn.Linear(in_dim, embed_dim) if embed_dim else nn.Identity()
        self.dim = embed_dim or in_dim

    def forward(self, feature_map: Tensor) -> Tensor:
        """Unnormalised embedding (N, D)."""
        return self.projection(torch.flatten(self.pool(feature_map), 1))


class CosineClassifier(nn.Module):
    """Normalised softmax: logits are cosines to class weights divided by a temperature."""

    def __init__(self, dim: int, num_classes: int, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * dim**-0.5)
        self.temperature = temperature

    def forward(self, embedding: Tensor) -> Tensor:
        """Logits (N, C) from embeddings of any norm."""
        return F.linear(F.normalize(embedding, dim=1), F.normalize(self.weight, dim=1)) / (
            self.temperature
        )


class EmbeddingNet(nn.Module):
    """Trunk -> head -> (L2-normalised embedding, class logits)."""

    def __init__(self, trunk: Trunk, head: EmbeddingHead, classifier: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.classifier = classifier

    def forward(self, x: Tensor) -> NetOutput:
        """Embed and classify a batch of normalised images."""
        feature_map, aux = self.trunk(x)
        features = self.head(feature_map)
        return NetOutput(F.normalize(features, dim=1), self.classifier(features), aux)


def feature_dim(model: nn.Module, family: str) -> int:
    """Channels of the trunk's last feature map, read from the torchvision classifier."""
    return (model.classifier if family == "densenet" else model.fc).in_features


def build_net(
    backbone: str,
    num_classes: int,
    weights: str = "none",
    embed_dim: int | None = None,
    head: str = "cosine",
    temperature: float = DEFAULT_TEMPERATURE,
) -> EmbeddingNet:
    """A fresh embedding network on a torchvision backbone with the given weights."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    family = BACKBONES[check_backbone(backbone)]
    model = build_torchvision_model(backbone, weights)
    in_dim = feature_dim(model, family)
    if family == "googlenet":
        model.aux1.fc2 = nn.Linear(model.aux1.fc2.in_features, num_classes)
        model.aux2.fc2 = nn.Linear(model.aux2.fc2.in_features, num_classes)
    embedding_head = EmbeddingHead(in_dim, embed_dim)
    classifier: nn.Module = (
        CosineClassifier(embedding_head.dim, num_classes, temperature)
        if head == "cosine"
        else nn.Linear(embedding_head.dim, num_classes)
    )
    return EmbeddingNet(Trunk(model, family), embedding_head, classifier)


def build_imagenet_net(backbone: str, weights: str = "imagenet") -> EmbeddingNet:
    """The pretrained classifier as an EmbeddingNet: its own 1000-class layer, no projection."""
    family = BACKBONES[check_backbone(backbone)]
    model = build_torchvision_model(backbone, weights)
    classifier = model.classifier if family == "densenet" else model.fc
    head = EmbeddingHead(feature_dim(model, family), None)
    if family == "googlenet":
        model.aux1 = model.aux2 = None  # not used for inference
    return EmbeddingNet(Trunk(model, family), head, classifier)
