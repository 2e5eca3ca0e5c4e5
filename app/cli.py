"""The imgsim command: one sub-command per stage (the collection's in app/collection_cli.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from app import collection_cli
from app.options import (
    RUNTIME_HELP,
    TRAINING,
    add_options,
    address_options,
    common_options,
    config_from,
    database_from,
    database_option,
    path_option,
    positive,
)
from index.errors import IndexProblem
from models.backbones import INSTALLED_BACKBONE
from models.errors import ImgsimError
from models.layout import BundleLayout
from models.memory import retain_freed_memory
from models.runtime import RUNTIMES
from models.workers import preload_in_workers

log = logging.getLogger("imgsim")
INIT_FROM_HELP = (
    "start from this bundle's trunk (and projection) with DATA_DIR's classes; its backbone and "
    "preprocessing are used, --weights is ignored"
)
EVAL_GALLERY_HELP = (
    "gallery to search (default: BUNDLE/index when it exists, else leave-one-out over DATA_DIR's "
    "images)"
)
DEMO_EPOCHS = 2  # the probe alone reaches 1.0 val top-1 on the shapes (docs/getting-started.md)

DESCRIPTION = """\
Fine-tune an ImageNet CNN on a folder of labelled images (one subfolder per class), index a
collection with FAISS, and serve POST /classify and POST /similar.

  imgsim train  DATA_DIR --out BUNDLE       fine-tune; DATA_DIR has one subfolder per class
  imgsim index  GALLERY_DIR --model BUNDLE  embed a folder into an index (default BUNDLE/index)
  imgsim eval   DATA_DIR --model BUNDLE     report on held-out class folders (BUNDLE/eval)
  imgsim serve  --model BUNDLE              serve it on http://127.0.0.1:8000 (docs at /docs)
  imgsim backup INDEX_DIR DEST              copy an index consistently, even while served
  imgsim quantize BUNDLE                    int8 model for --runtime onnx-int8 / openvino-int8
  imgsim classes add NAME DIR --model B     a new class from a few images, without retraining
  imgsim demo                               sample data -> train -> index -> serve
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the imgsim console script."""
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # every command runs forwards: train, index, eval, serve
    preload_in_workers("app.cli")  # each decoding worker runs the imgsim script's imports again
    _configure_logging(args.verbose)
    try:
        args.run(args)
    except (ImgsimError, IndexProblem, ValueError, ValidationError, FileExistsError) as err:
        print(_paragraph(f"imgsim {args.command}: {_message(err)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def _configure_logging(verbose: bool) -> None:
    """imgsim's progress at INFO; libraries' chatter (libvips' messages on how it shrinks each
    image, faiss' imports) only with --verbose, their warnings always."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for library in ("pyvips", "faiss", "ray"):
        logging.getLogger(library).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _message(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(e["msg"] for e in err.errors())
    return str(err)


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per stage."""
    parser = argparse.ArgumentParser(
        prog="imgsim", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, description, arguments, run) in COMMANDS.items():
        command = commands.add_parser(name, help=help, description=description)
        arguments(command)
        command.add_argument(
            "--verbose", action="store_true", help="also show the libraries' messages"
        )
        command.set_defaults(run=run)
    return parser


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    path_option(parser, "--out", "BUNDLE", "folder to write the bundle to", required=True)
    path_option(parser, "--init-from", "BUNDLE", INIT_FROM_HELP)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from BUNDLE/checkpoint.pt (same settings needed); "
        "the checkpoint is deleted once the bundle is saved",
    )
    common_options(parser)
    add_options(parser, TRAINING)


def _run_train(args: argparse.Namespace) -> None:
    """Train; under torchrun every process runs this and rank 0 writes the bundle."""
    from models.training import train

    init_from = str(args.init_from) if args.init_from else None
    config = config_from(args, init_from=init_from)
    bundle = train(args.data_dir, args.out, config, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # the other ranks' BatchNorm buffers differ slightly
        print(f"bundle written to {args.out} (model {bundle.fingerprint})")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    path_option(parser, "--model", "BUNDLE", "trained bundle folder", required=True)
    path_option(parser, "--index", "DIR", EVAL_GALLERY_HELP)
    parser.add_argument(
        "--no-index", action="store_true", help="use DATA_DIR's images as gallery (leave-one-out)"
    )
    database_option(parser)
    path_option(parser, "--out", "DIR", "report folder (default: BUNDLE/eval)")
    parser.add_argument(
        "--knn-k", type=positive, default=5, help="neighbours in the vote (default: %(default)s)"
    )
    add_options(parser, ("target_precision", "batch_size", "workers", "device"))
    parser.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="the runtime whose answers to measure, as for serve, e.g. onnx-int8 against an "
        "index built with fp32 (default: %(default)s)",
    )


def _run_eval(args: argparse.Namespace) -> None:
    from app.stages import evaluate_folder

    out = args.out or BundleLayout(args.model).eval
    report = evaluate_folder(
        args.data_dir,
        args.model,
        out,
        index_dir=args.index,
        use_index=not args.no_index,
        database=database_from(args),
        **_given(args, "knn_k", "target_precision", "batch_size", "workers", "device", "runtime"),
    )
    retrieval = report["retrieval"]
    print(
        f"top-1 {_shown(report['top1'])}  top-5 {_shown(report['top5'])}  "
        f"R@1 {_shown(retrieval['recall@1'])}  MAP@R {_shown(retrieval['map@r'])}  "
        f"kNN top-1 {_shown(report['knn_top1'])}\nreport: {out / 'report.html'}"
    )


def _given(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """The named options as keyword arguments of the same names."""
    return {name: getattr(args, name) for name in names}


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    path_option(parser, "--model", "BUNDLE", "trained bundle folder")
    path_option(parser, "--index", "DIR", "index folder (default: BUNDLE/index when it exists)")
    address_options(parser)
    parser.add_argument(
        "--allow-open-writes",
        action="store_true",
        help="on a non-loopback --host without IMGSIM_API_KEY, let anyone add and delete "
        "images (default: the service is read-only there)",
    )
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    database_option(parser)
    common_options(parser)


def _run_serve(args: argparse.Namespace) -> None:
    from app.settings import Settings
    from app.stages import serve

    settings = Settings(
        bundle_dir=args.model,
        index_dir=args.index,
        **_given(args, "backbone", "weights", "device", "runtime"),
        **({"allow_open_writes": True} if args.allow_open_writes else {}),
        **({"database_url": args.database} if args.database else {}),
    )
    serve(settings, args.host, args.port)


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, metavar="BUNDLE")
    path_option(
        parser,
        "--calibration",
        "DIR",
        "calibrate on the images below DIR (default: the training split of the folder the "
        "bundle was trained on, as recorded in its config.json)",
    )


def _run_quantize(args: argparse.Namespace) -> None:
    from models.bundle import Bundle

    bundle = Bundle.load(args.bundle, "cpu")
    bundle.use_runtime("onnx-int8", calibration=args.calibration)
    print(
        f"int8 model written to {BundleLayout(args.bundle).onnx_int8}; serve it with "
        f"'imgsim serve --model {args.bundle} --runtime openvino-int8' (or onnx-int8)"
    )


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("imgsim-demo"),
        help="where data and bundle go (default: %(default)s)",
    )
    address_options(parser)
    parser.add_argument("--no-serve", action="store_true", help="stop after indexing")
    common_options(parser, backbone=INSTALLED_BACKBONE)
    add_options(parser, TRAINING, epochs=DEMO_EPOCHS)


def _run_demo(args: argparse.Namespace) -> None:
    from app.stages import demo

    demo(args.workdir, config_from(args), args.host, args.port, serve_it=not args.no_serve)


# name -> (help, description, how to add its arguments, what runs it)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable]] = {
    "train": (
        "fine-tune on a folder of class subfolders",
        "Fine-tune a backbone on DATA_DIR (one subfolder per "
        "class, or train/ and val/ each with class subfolders) and save "
        "the best epoch as a bundle.",
        _train_arguments,
        _run_train,
    ),
    "index": (
        "embed a folder of images into a FAISS index",
        "Embed every image below GALLERY_DIR (labels from "
        "its subfolders) into an index. Without --model, the backbone's "
        "ImageNet model is used.",
        collection_cli.index_arguments,
        collection_cli.run_index,
    ),
    "eval": (
        "evaluate a bundle on held-out class folders",
        "Classify and search every image below DATA_DIR (one subfolder per class, "
        "images the model did not train on) and write report.json and report.html: top-1/top-5, "
        "per-class precision/recall/F1, confusion matrix, Recall@1/5/10, MAP@R, kNN-vote "
        "accuracy, the 'unknown' threshold, and the training curves.",
        _eval_arguments,
        _run_eval,
    ),
    "serve": (
        "serve /classify and /similar over HTTP",
        "Serve a bundle and its index. Without --model, "
        "serves the backbone's ImageNet classes, and /similar over "
        "--index if given (built with the same backbone).",
        _serve_arguments,
        _run_serve,
    ),
    "backup": (
        "copy an index folder consistently, even while it is served",
        "Copy INDEX_DIR (items, FAISS snapshot, kept images) to the new folder DEST with "
        "SQLite's online backup, safe while 'imgsim serve' writes to it. To restore, stop the "
        "server and put DEST in place of INDEX_DIR. With --database the items are read from "
        "PostgreSQL in one transaction into DEST/items.sqlite, so that DEST is served as it is, "
        "without the database; for backups kept in PostgreSQL, use pg_dump.",
        collection_cli.backup_arguments,
        collection_cli.run_backup,
    ),
    "quantize": (
        "make the int8 model of a bundle for --runtime openvino-int8 or onnx-int8",
        "Export BUNDLE's network to ONNX and quantise it statically to int8 (per-channel "
        "weights), calibrating activation ranges on up to 128 of its training images, or on "
        "--calibration DIR's. Written to BUNDLE/model.int8.onnx; 'imgsim serve --runtime "
        "openvino-int8' (or onnx-int8) would make it on first start too.",
        _quantize_arguments,
        _run_quantize,
    ),
    "classes": (
        "add a class from a few example images, without retraining",
        "add NAME DIR: a class whose classifier row is the mean embedding of the images in DIR "
        "(a few are enough), kept with the collection as POST /classes does; add to an added "
        "class for more examples; list; remove NAME. A running server sees it after a "
        "restart.",
        collection_cli.classes_arguments,
        collection_cli.run_classes,
    ),
    "demo": (
        "the built-in default: sample data, train, serve",
        "Generate a small dataset of shapes, fine-tune briefly, index it and serve it.",
        _demo_arguments,
        _run_demo,
    ),
}


if __name__ == "__main__":  # python -m app.cli, e.g. under torchrun
    sys.exit(main())
