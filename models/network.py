"""Embedding model: backbone trunk -> GAP -> optional projection -> L2 norm; classifier on top."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbones import build_model, get_backbone
from models.families import FeatureFn

HEADS = ("cosine", "linear")
DEFAULT_TEMPERATURE = 0.05  # Zhai & Wu (BMVC 2019): normalised softmax with temperature 0.05


@dataclass
class NetOutput:
    """What one forward pass yields."""

    embedding: Tensor  # L2-normalised, (N, D)
    logits: Tensor  # (N, C)
    aux_logits: list[Tensor]  # GoogLeNet's auxiliary classifiers in training mode, else empty


class Trunk(nn.Module):
    """The convolutional part of a backbone: image -> feature map (and any auxiliary logits)."""

    def __init__(self, body: nn.Module, features: FeatureFn):
        super().__init__()
        self.body = body
        self._features = features

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Feature map (N, F, h, w) and any auxiliary logits (GoogLeNet's, in training)."""
        return self._features(self.body, x)


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
        # Test-time mirror averaging: outside training, each image's features are the mean of
        # its own and its mirror image's (one forward of both), so a drawing and its mirror
        # embed alike. Set from the bundle's preprocessing; no weight changes.
        self.mirror = False

    def forward(self, x: Tensor) -> NetOutput:
        """Embed and classify a batch of normalised images."""
        if self.mirror and not self.training:
            feature_map, aux = self.trunk(torch.cat([x, x.flip(-1)]))
            features = self.head(feature_map).unflatten(0, (2, -1)).mean(0)
        else:
            feature_map, aux = self.trunk(x)
            features = self.head(feature_map)
        return NetOutput(F.normalize(features, dim=1), self.classifier(features), aux)


def build_net(
    backbone: str,
    num_classes: int,
    weights: str = "none",
    embed_dim: int | None = None,
    head: str = "cosine",
    temperature: float = DEFAULT_TEMPERATURE,
) -> EmbeddingNet:
    """A fresh embedding network on a registered backbone with the given weights."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    family = get_backbone(backbone).family
    model = build_model(backbone, weights)
    in_dim = family.width(model)
    family.adapt(model, num_classes)
    body, _ = family.cut(model)
    embedding_head = EmbeddingHead(in_dim, embed_dim)
    classifier: nn.Module = (
        CosineClassifier(embedding_head.dim, num_classes, temperature)
        if head == "cosine"
        else nn.Linear(embedding_head.dim, num_classes)
    )
    return EmbeddingNet(Trunk(body, family.features), embedding_head, classifier)


def build_imagenet_net(backbone: str, weights: str = "imagenet") -> EmbeddingNet:
    """The pretrained classifier as an EmbeddingNet: its own 1000-class layer, no projection."""
    family = get_backbone(backbone).family
    model = build_model(backbone, weights)
    head = EmbeddingHead(family.width(model), None)
    family.adapt(model, None)
    body, classifier = family.cut(model)
    return EmbeddingNet(Trunk(body, family.features), head, classifier)
