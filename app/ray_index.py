"""`imgsim index DIR --engine ray`: embed a collection of any size on Ray Data, then load it.

Two steps, each resumable:

1. Embed. The files below DIR (a local folder, or any URI pyarrow's filesystems read, such as
   s3://bucket/prefix) not yet in the collection are read, hashed and decoded with the one
   decode policy in CPU tasks, and embedded in a pool of actors that each load the bundle once
   and run it with the runtime (one GPU per actor where the cluster has GPUs). The driver
   writes what comes back as Parquet shards beside the index (app/embedding_shards.py); a
   rerun after a crash leaves out the files already in a shard.
2. Load. The shards are added to the collection through the same add path as the in-process
   index, a chunk of rows per transaction; a rerun leaves out the paths already there.

Files whose content is already in the collection under a path outside this run are left out,
as the in-process index leaves out known contents; so an interrupted and resumed run gives the
collection an uninterrupted run gives, and both give the in-process index's items.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from app.embedding_shards import (
    COMPLETE,
    dataset_folder,
    finished_shards,
    load_shards,
    write_shard,
)
from index.folder import replace_directory
from index.gallery import GalleryIndex
from models.backbones import Preprocessing
from models.bundle import Bundle
from models.config import BATCH_SIZE
from models.data import IMAGE_EXTENSIONS, SPLIT_FOLDERS, listing, scan_images
from models.errors import DatasetError, UnsupportedImage
from models.export import export_folder
from models.layout import BundleLayout
from models.transforms import decode, eval_transform, resized

log = logging.getLogger(__name__)

SHARD_ROWS = 2048  # rows per Parquet shard: 10 MB at efficientnet_lite0's 1280 floats
DECODE_ROWS = 64  # files per decode task call: ~0.1 s of work, far above a task's overhead
ACTOR_MEMORY = 2**30  # bytes Ray reserves for an embedding actor
RAY_MISSING = (
    "imgsim index --engine ray needs Ray Data, which is not installed. Install it with "
    "pip install 'imgsim[ray]' (or run without --engine ray to index in this process)."
)


@dataclass(frozen=True)
class Source:
    """Where the images are: a pyarrow filesystem and the root on it, and how the collection
    names a file (its resolved path for a local folder, else the URI)."""

    uri: str
    local: Path | None  # the folder, for a local source

    @classmethod
    def of(cls, where: str) -> Source:
        if "://" in where and not where.startswith("file://"):
            return cls(where.rstrip("/"), None)
        folder = Path(where.removeprefix("file://")).expanduser()
        return cls(str(folder), folder)

    def filesystem(self) -> Any:
        """(pyarrow FileSystem, root path on it)."""
        from pyarrow import fs

        if self.local is not None:
            return fs.LocalFileSystem(), str(self.local.resolve())
        return fs.FileSystem.from_uri(self.uri)

    def stored_path(self, relative: str) -> str:
        """The path the collection keeps for a file, as the in-process index keeps it."""
        if self.local is not None:
            return str((self.local / relative).resolve())
        return f"{self.uri}/{relative}"

    def list(self) -> tuple[list[str], list[tuple[Path, str]], bool]:
        """(relative paths of the image files, sorted; skipped entries with why; whether the
        root has the train/val layout). A local folder is listed as `imgsim index` lists it."""
        if self.local is not None:
            if not self.local.is_dir():
                return [], [], False
            found, skipped = scan_images(self.local)
            relative = [p.relative_to(self.local).as_posix() for p in found]
            return relative, skipped, all((self.local / s).is_dir() for s in SPLIT_FOLDERS)
        from pyarrow import fs

        filesystem, root = self.filesystem()
        selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
        infos = filesystem.get_file_info(selector)
        relative = sorted(
            PurePosixPath(info.path).relative_to(root).as_posix()
            for info in infos
            if info.type == fs.FileType.File
            and PurePosixPath(info.path).suffix.lower() in IMAGE_EXTENSIONS
            and not any(p.startswith(".") for p in PurePosixPath(info.path).relative_to(root).parts)
        )
        tops = {PurePosixPath(info.path).relative_to(root).parts[0] for info in infos}
        return relative, [], set(SPLIT_FOLDERS) <= tops


def index_on_ray(
    source_dir: str,
    bundle: Bundle,
    out_dir: Path,
    *,
    runtime: str = "auto",
    batch_size: int = BATCH_SIZE,
    address: str | None = None,
    factory: str | None = None,
    max_index_memory: int | None = None,
    rebuild: bool = False,
) -> GalleryIndex:
    """Embed the images below source_dir on Ray into Parquet shards, then add them to the
    collection at out_dir (made if there is none; made afresh with rebuild). Returns the
    collection, closed."""
    try:
        import ray
    except ImportError:
        raise DatasetError(RAY_MISSING) from None
    from app.stages import new_collection, open_for_update

    source = Source.of(source_dir)
    relative, skipped, split = source.list()
    if not relative:
        raise DatasetError(
            f"{source.uri} holds no image files (.jpg, .png, .webp, ...)"
            + (f"; skipped: {listing(skipped)}" if skipped else "")
            + ". Pass the folder of images to index."
        )
    # A rebuild fills a folder of its own (a rerun continues it) and replaces out_dir at the end.
    target = out_dir.with_name(f".{out_dir.name}.rebuilding") if rebuild else out_dir
    gallery = open_for_update(target, bundle, factory, max_index_memory)
    created = gallery is None
    if gallery is None:
        shutil.rmtree(target, ignore_errors=True)
        gallery = new_collection(target, bundle, factory, max_index_memory)
    dataset = dataset_folder(target)
    try:
        stored = gallery.contents_by_path()
        done = finished_shards(dataset, bundle.fingerprint)
        todo = [r for r in relative if source.stored_path(r) not in stored and r not in done]
        log.info(
            "%d images: %d in the collection, %d embedded by an earlier run, %d to embed",
            len(relative),
            sum(source.stored_path(r) in stored for r in relative),
            sum(r in done for r in relative),
            len(todo),
        )
        failed: list[tuple[Path, str]] = []
        if todo:
            _start_ray(ray, address)
            failed = _embed(ray, source, todo, split, bundle, runtime, batch_size, dataset)
        problems = skipped + failed
        if problems:
            log.warning("skipping %d unreadable file(s): %s", len(problems), listing(problems))
        load_shards(dataset, source.stored_path, gallery, stored)
        if not len(gallery):
            raise DatasetError(
                f"none of the {len(relative)} image files below {source.uri} could be indexed: "
                f"{listing(problems)}. Replace or remove them and run 'imgsim index' again."
            )
        (dataset / COMPLETE).touch()
        if gallery.kind.for_size(len(gallery)) != gallery.vectors.factory:
            gallery.rebuild()  # the kind for the collection's final size, trained on all of it
    except DatasetError:
        gallery.close()
        if created:
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(dataset, ignore_errors=True)
        raise
    gallery.close()
    if rebuild:
        replace_directory(target, out_dir)
        shutil.rmtree(dataset_folder(out_dir), ignore_errors=True)
        dataset.rename(dataset_folder(out_dir))
    return gallery


def _start_ray(ray: Any, address: str | None) -> None:
    """Connect to the cluster at address (or RAY_ADDRESS), else start Ray in this process
    with this machine's CPUs; Ray Data's own progress bars give way to ours."""
    if not ray.is_initialized():
        local = address is None and not os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            num_cpus=os.cpu_count() if local else None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def _embed(
    ray: Any,
    source: Source,
    todo: list[str],
    split: bool,
    bundle: Bundle,
    runtime: str,
    batch_size: int,
    dataset: Path,
) -> list[tuple[Path, str]]:
    """Run the pipeline over todo, writing its output as shards; returns the unreadable files."""
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpus else 1
    files = _bundle_files(bundle, runtime if not gpus else "torch")
    blocks = max(1, min(len(todo) // DECODE_ROWS, 1000))
    pipeline = (
        ray.data.from_items([{"path": r} for r in todo], override_num_blocks=blocks)
        .map_batches(
            _decode_batch,
            batch_size=DECODE_ROWS,
            fn_kwargs={"source": source, "pre": bundle.config.preprocessing},
            num_cpus=1,
        )
        .map_batches(
            Embedder,
            batch_size=batch_size,
            fn_constructor_kwargs={
                "files": ray.put(files),
                "device": "cuda" if gpus else "cpu",
                "runtime": runtime if not gpus else "torch",
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if gpus else 0,
            num_cpus=1,
            # What an actor holds (the bundle, its runtime, a batch in flight), for Ray's
            # placement. Ray Data fuses two stages whose resources match into one; these
            # differ, so decoding stays in tasks of its own beside the forward.
            memory=ACTOR_MEMORY,
        )
    )
    failed: list[tuple[Path, str]] = []
    shard: list[dict[str, np.ndarray]] = []
    rows = 0
    with tqdm(total=len(todo), desc="embedding", unit="image") as progress:
        for batch in pipeline.iter_batches(batch_size=None, batch_format="numpy"):
            bad = batch["error"] != ""
            failed += [(Path(source.stored_path(p)), e) for p, e in zip(
                batch["path"][bad], batch["error"][bad], strict=True)]  # fmt: skip
            good = {key: batch[key][~bad] for key in ("path", "sha256", "embedding")}
            shard.append(good)
            rows += len(good["path"])
            progress.update(len(batch["path"]))
            if rows >= SHARD_ROWS:
                write_shard(dataset, shard, split, bundle.fingerprint)
                shard, rows = [], 0
        if rows:
            write_shard(dataset, shard, split, bundle.fingerprint)
    return failed


def _bundle_files(bundle: Bundle, runtime: str) -> dict[str, bytes]:
    """The files an actor rebuilds the bundle from: config and weights, and the runtime's
    export when it is made from them (made here once, not by every actor)."""
    if bundle.directory is None:
        folder = Path(tempfile.mkdtemp(prefix="imgsim-bundle-"))
        bundle.save(folder)
    else:
        folder = bundle.directory
    layout = BundleLayout(folder)
    files = {p.name: p.read_bytes() for p in (layout.config, layout.weights)}
    if runtime != "torch":
        bundle.use_runtime(runtime)  # exports into the bundle's export folder on first use
        export = BundleLayout(export_folder(bundle)).onnx
        if export.is_file():
            files[export.name] = export.read_bytes()
    return files


def _decode_batch(
    batch: dict[str, np.ndarray], source: Source, pre: Preprocessing
) -> dict[str, np.ndarray]:
    """A Ray task: read, hash and decode each file to its resized uint8 square, as every stage
    does, and keep the centre crop_size square the network sees (less to move to the actor);
    a file that cannot be read or decoded gets a blank and the reason."""
    filesystem, root = source.filesystem()
    size = pre.crop_size
    pixels = np.zeros((len(batch["path"]), 3, size, size), np.uint8)
    hashes, errors = [], []
    for i, relative in enumerate(batch["path"]):
        sha, why = "", ""
        try:
            with filesystem.open_input_stream(f"{root}/{relative}") as stream:
                data = stream.read()
            sha = hashlib.sha256(data).hexdigest()
            square = resized(decode(data, pre), pre)
            pixels[i] = v2.functional.center_crop(square, [size]).numpy()
        except (UnsupportedImage, OSError) as err:
            why = str(err) or "unreadable"
        hashes.append(sha)
        errors.append(why)
    return {
        "path": batch["path"],
        "sha256": np.asarray(hashes),
        "error": np.asarray(errors),
        "pixels": pixels,
    }


class Embedder:
    """A Ray actor: the bundle, loaded once from its files, runs each batch of decoded images
    through the runtime (centre crop and normalise, then the forward)."""

    def __init__(self, files: Any, device: str, runtime: str):  # files: an ObjectRef of a dict
        import ray

        folder = Path(tempfile.mkdtemp(prefix="imgsim-actor-"))
        for name, data in ray.get(files).items():
            (folder / name).write_bytes(data)
        self.bundle = Bundle.load(folder, device)
        self.bundle.use_runtime(runtime)
        self.transform = eval_transform(self.bundle.config.preprocessing)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        embeddings = np.zeros((len(ok), self.bundle.embedding_dim), np.float32)
        if ok.any():
            x = self.transform(torch.from_numpy(batch["pixels"][ok]))
            embeddings[ok] = self.bundle.forward(x).embeddings
        kept = {key: batch[key] for key in ("path", "sha256", "error")}
        return {**kept, "embedding": embeddings}
