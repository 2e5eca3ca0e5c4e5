"""The training configuration: every knob with its default and its help, in one place.

The command line's options are generated from these fields (`app/options.py`), so a default
or its explanation changes here and nowhere else. The encode batch size and the precision the
"unknown" threshold aims for are shared by index and eval, so they are named constants here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.backbones import BACKBONES, DEFAULT_BACKBONE, DEFAULT_FIT, FITS, INSTALLED_BACKBONE
from models.devices import DEVICES
from models.losses import METRIC_LOSSES
from models.network import DEFAULT_TEMPERATURE, HEADS

BATCH_SIZE = 32
TARGET_PRECISION = 0.95
WORKERS = 2


def knob(
    default: Any,
    help: str,
    kind: str | None = None,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with what its command-line option needs: help, and optionally the value's
    kind ('positive', 'fraction'), the flag of a boolean, the choices or the metavar."""
    meta = {"help": help, "kind": kind, "flag": flag, "choices": choices, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every knob of a training run; saved with the bundle."""

    backbone: str = knob(
        DEFAULT_BACKBONE,
        f"one of {', '.join(BACKBONES)}; {INSTALLED_BACKBONE}/1/2's ImageNet weights are "
        "installed with imgsim, the torchvision ones' are downloaded once into TORCH_HOME",
        choices=tuple(BACKBONES),
        metavar="NAME",
    )
    weights: str = knob(
        "imagenet",
        "start from the backbone's ImageNet weights, random weights, or a state-dict file",
        metavar="imagenet|none|PATH",
    )
    # With LP-FT the val loss levels off by 6 on small sets (benchmarks/transfer_tuning.md).
    epochs: int = knob(6, "fine-tuning epochs after the probe", "positive")
    warmup_epochs: int = knob(0, "head-only epochs with augmentation before fine-tuning")
    batch_size: int = knob(BATCH_SIZE, "images per batch (per process under torchrun)", "positive")
    lr: float = knob(1e-3, "head learning rate; the trunk gets --backbone-lr-factor of it")
    backbone_lr_factor: float = knob(0.1, "the trunk's share of --lr while fine-tuning")
    weight_decay: float = knob(1e-4, "AdamW weight decay")
    embed_dim: int | None = knob(
        None, "project the pooled features to this size (default: keep them)", "positive"
    )
    head: str = knob("cosine", "classifier over the embedding", choices=HEADS)
    temperature: float = knob(DEFAULT_TEMPERATURE, "the cosine classifier's temperature")
    aux_weight: float = knob(0.3, "weight of GoogLeNet's auxiliary losses, as in the paper")
    val_fraction: float = knob(
        0.2, "share of each class held out when DATA_DIR has no train/ and val/", "fraction"
    )
    seed: int = knob(0, "random seed")
    device: str = knob("auto", "auto = the GPU when present", choices=DEVICES)
    workers: int = knob(WORKERS, "DataLoader worker processes that decode images")
    amp: bool = knob(True, "train in full precision on CUDA (no AMP)", flag="--no-amp")
    image_size: int | None = knob(
        None, "train and serve at this crop size (default: the weights' own, e.g. 224)", "positive"
    )
    # MAP@R 60.2 against cross-entropy alone's 48.7, top-1 and R@1 within the seeds' spread
    # (benchmarks/quality.md, letterboxed).
    metric_loss: str = knob(
        "multi-similarity",
        "a metric-learning loss on the embeddings, added to the classifier's cross-entropy",
        choices=METRIC_LOSSES,
    )
    metric_weight: float = knob(1.0, "the metric-learning loss's weight beside cross-entropy")
    # CosFace (Wang et al., CVPR 2018): in training, the true class's cosine counts this much
    # less, so each class gathers closer to its row than the softmax alone asks.
    margin: float = knob(
        0.0, "additive cosine margin on the true class while training (cosine head only)"
    )
    fit: str = knob(
        DEFAULT_FIT,
        "how an image is fitted to the network's square, in training and wherever the bundle "
        "embeds: crop (short side, centre square), letterbox (whole, on its background) or "
        "resize (whole, stretched)",
        choices=FITS,
    )
    init_from: str | None = None  # a bundle whose trunk (and projection) to start from
    target_precision: float = knob(
        TARGET_PRECISION,
        "calibrate the 'unknown' threshold on the val split for this precision",
        "fraction",
    )
    augment: bool = knob(
        True,
        "train on the images as served (resize, centre crop), without random augmentation",
        flag="--no-augment",
    )
    # LP-FT (Kumar et al., ICLR 2022): fit head and classifier on the frozen trunk's features
    # first (one forward pass, then full-batch steps on the features), then fine-tune.
    probe: bool = knob(
        True,
        "skip LP-FT's first step (fitting the head on frozen features before fine-tuning)",
        flag="--no-probe",
    )
    probe_steps: int = knob(300, "full-batch optimiser steps of the probe", "positive")
    probe_lr: float = knob(1e-2, "learning rate of the probe")
    freeze_bn: bool = knob(
        True,
        "update BatchNorm statistics while fine-tuning (default: kept as pretrained)",
        flag="--train-bn",
    )
    trunk_share: float = knob(
        1.0,
        "the share of the trunk's layers, counted from its output end, that fine-tuning "
        "updates; the others keep their ImageNet weights",
        "fraction",
    )
    cache_decoded: bool = knob(
        True,
        "decode images every epoch instead of once per run into BUNDLE/.decoded-*",
        flag="--no-decode-cache",
    )

    def __post_init__(self) -> None:
        self.warmup_epochs = min(self.warmup_epochs, self.epochs)
