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


def test_multi_similarity_prefers_embeddings_grouped_by_class() -> None:
    loss = metric_loss("multi-similarity")
    assert loss is not None and metric_loss("none") is None
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)  # 4 classes of 4
    centres = F.normalize(torch.randn(4, 16), dim=1)
    grouped = F.normalize(centres[labels] + 0.05 * torch.randn(16, 16), dim=1)
    scattered = F.normalize(torch.randn(16, 16), dim=1)
    assert loss(grouped, labels) < 0.5 * loss(scattered, labels)


def test_an_unknown_metric_loss_is_named() -> None:
    with pytest.raises(ValueError, match="unknown metric loss 'triplet'; choose one of: none"):
        metric_loss("triplet")


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
