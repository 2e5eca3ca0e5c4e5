"""The metric-learning loss: it scores how embeddings group by class, and training uses it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.losses import metric_loss
from models.training import train
from tests.test_training_extras import TINY, _two_classes


@pytest.mark.parametrize("name", ["multi-similarity", "proxy-anchor"])
def test_the_loss_prefers_embeddings_grouped_by_class(name: str) -> None:
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)  # 4 classes of 4
    centres = F.normalize(torch.randn(4, 16), dim=1)
    loss = metric_loss(name, torch.nn.Parameter(centres.clone()))
    assert loss is not None and metric_loss("none", torch.nn.Parameter(centres)) is None
    grouped = F.normalize(centres[labels] + 0.05 * torch.randn(16, 16), dim=1)
    scattered = F.normalize(torch.randn(16, 16), dim=1)
    assert loss(grouped, labels) < 0.5 * loss(scattered, labels)


def test_proxy_anchor_trains_the_classifier_rows() -> None:
    """Its proxies are the classifier's weights: its gradient reaches them, and no other
    parameter is made (the optimiser and the bundle stay as they were)."""
    rows = torch.nn.Parameter(torch.randn(3, 8))
    loss = metric_loss("proxy-anchor", rows)
    assert loss is not None
    loss(F.normalize(torch.randn(6, 8), dim=1), torch.tensor([0, 0, 1, 1, 2, 2])).backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0


def test_an_unknown_metric_loss_is_named() -> None:
    with pytest.raises(ValueError, match="unknown metric loss 'triplet'; choose one of: none"):
        metric_loss("triplet", torch.nn.Parameter(torch.zeros(2, 4)))


@pytest.mark.slow
def test_training_adds_the_metric_loss(tmp_path: Path) -> None:
    """The same run with the loss added reports a larger training loss (CE + MS > CE)."""
    data = _two_classes(tmp_path)
    losses = {}
    for name in ("none", "multi-similarity"):
        config = replace(TINY, epochs=1, warmup_epochs=0, metric_loss=name)
        train(data, tmp_path / name, config)
        history = json.loads((tmp_path / name / "metrics.json").read_text())
        losses[name] = history[-1]["train_loss"]
    assert losses["multi-similarity"] > losses["none"]


@pytest.mark.slow
def test_a_margin_pulls_each_class_closer_to_its_row(tmp_path: Path) -> None:
    """--margin (CosFace): the same probe with the true class's cosine handicapped ends with the
    training images further ahead of the other class on their own row."""
    data = _two_classes(tmp_path)
    gaps = {}
    for margin in (0.0, 0.3):
        config = replace(TINY, epochs=0, embed_dim=8, margin=margin)
        bundle = train(data, tmp_path / f"m{margin}", config)
        encoded = bundle.encode(sorted(data.rglob("*.png")))
        rows = F.normalize(bundle.net.classifier.weight.detach(), dim=1).numpy()
        cosines = encoded.embeddings @ rows.T
        own = [bundle.config.classes.index(p.parent.name) for p in sorted(data.rglob("*.png"))]
        ahead = [c[k] - c[1 - k] for c, k in zip(cosines, own, strict=True)]
        gaps[margin] = sum(ahead) / len(ahead)
    assert gaps[0.3] > gaps[0.0] + 0.2
