"""Training under torchrun: two CPU processes (gloo) against one process with the same global
batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main
from models.bundle import Bundle
from models.images import load_image
from models.network import build_net
from models.samples import make_sample_dataset

# Two warm-up epochs (trunk frozen, BatchNorm in eval mode), no augmentation and one batch per
# epoch: each step sees the same 8 images in both runs, so the only difference is the order of
# floating-point sums (each rank's mean loss over 4 images, then DDP's mean of the two
# gradients). Embeddings must agree to 1e-5. With augmentation, several batches per epoch or
# fine-tuning epochs they would not be bit-comparable: ranks draw other augmentations, see other
# images per step (DistributedSampler's permutation), and BatchNorm normalises each replica's
# 4 images with their own statistics.
TOLERANCE = 1e-5


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    data = make_sample_dataset(tmp_path / "data", per_class=5, size=48)
    for shape in ("triangle", "star"):
        for path in (data / shape).iterdir():
            path.unlink()
        (data / shape).rmdir()
    common = [
        "train",
        str(data),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        "2",
        "--warmup-epochs",
        "2",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-augment",
        "--target-precision",
        "0.5",
        "--lr",
        "0.01",
    ]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"]) == 0
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        "-m",
        "app.cli",
    ]
    done = subprocess.run(
        [*launch, *common, "--out", str(tmp_path / "two"), "--batch-size", "4"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = Bundle.load(tmp_path / "one", "cpu"), Bundle.load(tmp_path / "two", "cpu")
    assert two.config.classes == one.config.classes
    assert two.config.extra["world_size"] == 2 and one.config.extra["world_size"] == 1
    images = [load_image(path) for path in sorted(data.rglob("*.png"))[::2]]
    (p1, e1), (p2, e2) = one.classify(images), two.classify(images)
    np.testing.assert_allclose(e2, e1, atol=TOLERANCE)
    np.testing.assert_allclose(p2, p1, atol=TOLERANCE)
    # The classifier did learn (far more than the tolerance), so the agreement means something:
    # the starting network is what train() builds after seeding.
    torch.manual_seed(0)
    start = Bundle(one.config, build_net("resnet18", 2, "none"), "cpu")
    assert np.abs(start.classify(images)[0] - p1).max() > 100 * TOLERANCE
    h1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    h2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    for a, b in zip(h1, h2, strict=True):  # val metrics are all-reduced over both ranks
        assert b["val_top1"] == a["val_top1"]
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-3)
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-3)
    assert not (tmp_path / "two" / "checkpoint.pt").exists()
