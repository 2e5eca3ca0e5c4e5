"""Command-line options generated from the TrainConfig fields: one default, one help text."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import Field, fields
from typing import Any

from models.config import TrainConfig

COMMON = ("backbone", "weights", "device", "seed")
TRAINING = (
    "epochs", "warmup_epochs", "batch_size", "lr", "backbone_lr_factor", "weight_decay",
    "embed_dim", "head", "temperature", "val_fraction", "workers", "image_size", "fit",
    "target_precision", "augment", "probe", "probe_steps", "probe_lr", "freeze_bn",
    "cache_decoded", "amp", "metric_loss", "metric_weight",
)  # fmt: skip
_FIELDS: dict[str, Field] = {f.name: f for f in fields(TrainConfig)}


def add_options(parser: argparse.ArgumentParser, names: Iterable[str], **defaults: Any) -> None:
    """An option for each named TrainConfig field, with its default (or the one given) and help."""
    for name in names:
        field = _FIELDS[name]
        meta, default = field.metadata, defaults.get(name, field.default)
        if isinstance(field.default, bool):
            action = "store_false" if default else "store_true"
            parser.add_argument(meta["flag"], dest=name, action=action, help=meta["help"])
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=_converter(meta["kind"], default),
            default=default,
            choices=meta["choices"],
            metavar=meta["metavar"],
            help=meta["help"] + ("" if default is None else " (default: %(default)s)"),
        )


def config_from(args: argparse.Namespace, **values: Any) -> TrainConfig:
    """The TrainConfig of the parsed options (fields without an option keep their default)."""
    given = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    return TrainConfig(**{**given, **values})


def _converter(kind: str | None, default: Any) -> Callable[[str], Any]:
    if kind == "positive":
        return positive
    if kind == "fraction":
        return fraction
    return type(default) if default is not None else str


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number between 0 and 1."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, not {text}")
    return value
