"""The backbone registry, ImageNet weights through torchvision's cache, and the embedding net."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.models import get_model

from models.backbones import BACKBONES, build_model
from models.bundle import Bundle
from models.errors import WeightsUnavailable
from models.network import build_net


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_builds_embeds_and_trains(name: str) -> None:
    torch.manual_seed(0)
    net = build_net(name, num_classes=3, weights="none", embed_dim=8).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    out = net(x)
    assert out.embedding.shape == (2, 8) and out.logits.shape == (2, 3)
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(2), atol=1e-5)
    assert len(out.aux_logits) == (2 if name == "googlenet" else 0)
    loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(a, y) for a in out.aux_logits)
    before = net.head.projection.weight.detach().clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, net.head.projection.weight)
    assert net.eval()(x).aux_logits == []


def test_unknown_backbone_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="densenet121.*googlenet"):
        build_net("vgg16", 3)


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path


def test_imagenet_weights_come_from_the_torch_home_cache(cached_resnet18: torch.nn.Module) -> None:
    reference = cached_resnet18
    bundle = Bundle.pretrained("resnet18", device="cpu")  # no network: the cached file is used
    assert len(bundle.config.classes) == 1000 and bundle.config.classes[0] == "tench"
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(bundle.net(x).logits, reference(x), atol=1e-5)


def test_missing_imagenet_weights_name_the_file_and_where_to_put_it(torch_home: Path) -> None:
    with pytest.raises(WeightsUnavailable) as caught:
        build_model("densenet121", "imagenet")
    message = str(caught.value)
    expected = torch_home / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    assert str(expected) in message
    assert "https://download.pytorch.org/models/densenet121-a639ec97.pth" in message
    assert "--weights none" in message
    assert not list((torch_home / "hub" / "checkpoints").glob("*"))  # no partial file left


def test_state_dict_file_weights(tmp_path: Path) -> None:
    torch.manual_seed(2)
    reference = get_model("resnet18", weights=None)
    path = tmp_path / "mine.pt"
    torch.save(reference.state_dict(), path)
    loaded = build_model("resnet18", path)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)


def test_state_dict_file_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(get_model("resnet34", weights=None).state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="does not fit a resnet18"):
        build_model("resnet18", path)


def test_pickled_objects_are_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weights": object()}, path)
    with pytest.raises(WeightsUnavailable, match="could not be read as a state dict"):
        build_model("resnet18", path)
