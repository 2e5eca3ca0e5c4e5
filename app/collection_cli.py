"""The commands on a collection: index (embed a folder into it), backup, classes."""

from __future__ import annotations

import argparse
from pathlib import Path

from app.options import (
    RUNTIME_HELP,
    add_options,
    common_options,
    database_from,
    database_option,
    path_option,
    positive,
)
from index.database import Database
from models.errors import DatasetError
from models.layout import BundleLayout
from models.runtime import RUNTIMES


def index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gallery_dir", metavar="GALLERY_DIR")  # a folder, or a URI for Ray
    path_option(parser, "--model", "BUNDLE", "trained bundle folder")
    path_option(parser, "--out", "DIR", "index folder (default: BUNDLE/index, or ./index-BACKBONE)")
    add_options(parser, ("batch_size", "workers"))
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="re-embed every image into a fresh index instead of adding only new files",
    )
    parser.add_argument(
        "--index-factory",
        metavar="FACTORY",
        help="FAISS factory string, e.g. HNSW32,Flat (default: chosen from the collection size)",
    )
    parser.add_argument(
        "--max-index-memory",
        type=positive,
        metavar="BYTES",
        help="keep the index within BYTES: where the full vectors (Flat or HNSW) would need "
        "more, the chosen kind is IVF-PQ, which stores compressed codes; kept with the "
        "collection (default: no limit)",
    )
    parser.add_argument("--runtime", default="auto", choices=RUNTIMES, help=RUNTIME_HELP)
    parser.add_argument(
        "--engine",
        default="process",
        choices=("process", "ray"),
        help="embed in this process with --workers decoders, or on Ray Data (pip install "
        "'imgsim[ray]'): GALLERY_DIR may then be a URI such as s3://bucket/prefix, the "
        "embeddings are kept as Parquet shards beside the index and a rerun resumes "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster to run on (default: RAY_ADDRESS, else Ray started here)",
    )
    database_option(parser)
    common_options(parser)


def run_index(args: argparse.Namespace) -> None:
    from app.stages import index_folder
    from models.bundle import Bundle

    if args.model is not None:
        bundle = Bundle.load(args.model, args.device)
    else:
        bundle = Bundle.pretrained(args.backbone, args.weights, args.device)
    bundle.use_runtime(args.runtime)
    default = BundleLayout(args.model).index if args.model else Path(f"index-{args.backbone}")
    out = args.out or default
    database = database_from(args)
    if args.engine == "ray" and database is not None:
        raise DatasetError(
            "--engine ray keeps the items in the index folder's items.sqlite only, for now: "
            "index into PostgreSQL with --engine process."
        )
    common = {
        "batch_size": args.batch_size,
        "rebuild": args.rebuild,
        "factory": args.index_factory,
        "max_index_memory": args.max_index_memory,
    }
    if args.engine == "ray":
        from app.ray_index import index_on_ray

        source = str(args.gallery_dir)
        gallery = index_on_ray(
            source, bundle, out, runtime=args.runtime, address=args.ray_address, **common
        )
    elif "://" in args.gallery_dir:
        raise DatasetError(
            f"{args.gallery_dir} is a URI, which only --engine ray reads. Add --engine ray "
            "(pip install 'imgsim[ray]'), or copy the images to a local folder."
        )
    else:
        folder = Path(args.gallery_dir)
        gallery = index_folder(
            folder, bundle, out, workers=args.workers, database=database, **common
        )
    where = indexed_into(out, database)
    print(f"indexed {len(gallery)} images into {where} (model {bundle.fingerprint})")


def backup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    parser.add_argument("dest", type=Path, metavar="DEST", help="new folder for the copy")
    database_option(parser)


def run_backup(args: argparse.Namespace) -> None:
    from index.backup import backup_collection

    count = backup_collection(args.index_dir, args.dest, database_from(args))
    print(f"backed up {count} items of {args.index_dir} to {args.dest}")


def classes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("add", "list", "remove"))
    parser.add_argument("name", nargs="?", metavar="NAME", help="the class (add, remove)")
    parser.add_argument(
        "images", nargs="?", type=Path, metavar="DIR", help="its example images (add)"
    )
    path_option(parser, "--model", "BUNDLE", "trained bundle folder")
    path_option(parser, "--index", "DIR", "the collection (default: BUNDLE/index)")
    database_option(parser)
    add_options(parser, ("workers",))


def run_classes(args: argparse.Namespace) -> None:
    from app.classes_cli import change_classes

    if args.model is None or (args.action != "list" and args.name is None):
        raise DatasetError(
            "imgsim classes needs --model BUNDLE, and a NAME to add or remove: e.g. "
            "'imgsim classes add NAME DIR --model BUNDLE'."
        )
    if args.action == "add" and args.images is None:
        raise DatasetError("imgsim classes add needs the folder of example images: NAME DIR.")
    classifier = change_classes(
        args.action,
        args.model,
        args.index,
        args.name,
        args.images,
        args.workers,
        database_from(args),
    )
    for added in classifier.added:
        print(f"{added.name}\tadded from {added.examples} image(s)")
    print(f"{len(classifier.trained)} trained classes; classifier {classifier.version}")


def indexed_into(out: Path, database: Database | None) -> str:
    return f"{out}" + (f" (items in {database})" if database is not None else "")
