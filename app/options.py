"""The command line's options: those generated from the TrainConfig fields (one default, one
help text), and those several commands share (the model, the database, paths, the address)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

from index.database import Database
from models.config import TrainConfig

COMMON = ("backbone", "weights", "device", "seed")
TRAINING = (
    "epochs", "warmup_epochs", "batch_size", "lr", "backbone_lr_factor", "weight_decay",
    "embed_dim", "head", "temperature", "val_fraction", "workers", "image_size", "fit",
    "target_precision", "augment", "probe", "probe_steps", "probe_lr", "freeze_bn",
    "cache_decoded", "amp", "metric_loss", "metric_weight", "trunk_share", "margin",
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


RUNTIME_HELP = (
    "where the network runs: auto (OpenVINO fp32 on the CPU, else ONNX Runtime; PyTorch on a "
    "GPU), torch, onnx or openvino (fp32), openvino-bf16 (CPUs with bf16 instructions), "
    "onnx-int8 or openvino-int8 (quantised, calibrated on the bundle's training images; see "
    "'imgsim quantize'); exports are kept in the bundle folder (default: %(default)s)"
)
DATABASE_HELP = (
    "PostgreSQL URL, e.g. postgresql://USER:PASSWORD@HOST/DB, that keeps the collection's items "
    "and change log in place of the index folder's items.sqlite; the folder keeps the FAISS "
    "snapshots and images (default: IMGSIM_DATABASE_URL when set; pip install 'imgsim[postgres]')"
)


def database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", metavar="URL", help=DATABASE_HELP)


def database_from(args: argparse.Namespace) -> Database | None:
    """--database, else IMGSIM_DATABASE_URL (read by the service settings), else None: the
    items are in the index folder's items.sqlite."""
    from app.settings import Settings

    return Database(args.database) if args.database else Settings().database()


def common_options(parser: argparse.ArgumentParser, **defaults: object) -> None:
    # IMGSIM_BACKBONE, which serve reads (the image sets it), is every command's default too.
    if os.environ.get("IMGSIM_BACKBONE") and "backbone" not in defaults:
        defaults["backbone"] = os.environ["IMGSIM_BACKBONE"]
    add_options(parser, COMMON, **defaults)


def path_option(
    parser: argparse.ArgumentParser, flag: str, metavar: str, help: str, required: bool = False
) -> None:
    parser.add_argument(flag, type=Path, metavar=metavar, required=required, help=help)


def address_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
