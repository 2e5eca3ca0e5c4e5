"""The stages the CLI drives, as plain functions: train, index, eval, serve, demo."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

from app.limits import headers_within
from app.main import create_app
from app.service import load_service
from app.settings import Settings
from index.database import Database
from index.errors import IndexMissing, ModelMismatch
from index.folder import discard, replace_directory
from index.gallery import GalleryIndex
from index.store import NewItem
from models.bundle import Bundle
from models.config import BATCH_SIZE, TARGET_PRECISION, WORKERS
from models.data import label_of, listing, scan_images
from models.errors import DatasetError
from models.evaluation import (
    Neighbours,
    evaluate,
    leave_one_out,
    list_eval_images,
    neighbours_needed,
)
from models.layout import BundleLayout
from models.report import write_report
from models.samples import make_sample_dataset
from models.training import TrainConfig, train

log = logging.getLogger(__name__)


def index_folder(
    gallery_dir: Path,
    bundle: Bundle,
    out_dir: Path,
    *,
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
    rebuild: bool = False,
    factory: str | None = None,
    max_index_memory: int | None = None,
    database: Database | None = None,
) -> GalleryIndex:
    """Add the readable images below gallery_dir to the index at out_dir (its items in the
    database if given), skipping files already indexed (same content); build it afresh when
    there is none, when it belongs to another model, or with rebuild. Each file is read once to
    hash it and decoded once to embed it. max_index_memory (bytes, kept with the collection)
    makes the chosen index kind IVF-PQ where Flat or HNSW would need more."""
    paths, skipped = scan_images(gallery_dir) if gallery_dir.is_dir() else ([], [])
    if not paths:
        raise DatasetError(
            f"{gallery_dir} holds no image files (.jpg, .png, .webp, ...)"
            + (f"; skipped: {listing(skipped)}" if skipped else "")
            + ". Pass the folder of images to index."
        )
    target, target_database = out_dir, database
    gallery = (
        None if rebuild else open_for_update(out_dir, bundle, factory, max_index_memory, database)
    )
    if gallery is None:  # built aside, then put in place of the old collection
        target = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
        target_database = database.staging() if database is not None else None
        discard(target, target_database)
        gallery = new_collection(target, bundle, factory, max_index_memory, target_database)
    known = gallery.known_contents()
    hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]
    new = [(path, sha) for path, sha in zip(paths, hashes, strict=True) if sha not in known]
    log.info(
        "%d images, %d already indexed, %d to add", len(paths), len(paths) - len(new), len(new)
    )
    encoded = bundle.encode([path for path, _ in new], batch_size, workers, skip_unreadable=True)
    unreadable = dict(encoded.failed)
    problems = skipped + [(new[i][0], why) for i, why in unreadable.items()]
    if problems:
        log.warning("skipping %d unreadable file(s): %s", len(problems), listing(problems))
    readable = [pair for i, pair in enumerate(new) if i not in unreadable]
    if not readable and len(new) == len(paths):  # not one image of the folder is indexed
        gallery.close()
        if target != out_dir:
            discard(target, target_database)
        raise DatasetError(
            f"none of the {len(new)} image files below {gallery_dir} could be indexed: "
            f"{listing(problems)}. Replace or remove them and run 'imgsim index' again."
        )
    # Label by the path as found (a symlink may point outside the gallery); store it resolved.
    items = [NewItem(str(p.resolve()), label_of(p, gallery_dir), sha256=s) for p, s in readable]
    if target != out_dir:  # a new index: built once, as the kind for its final size
        gallery.fill(encoded.embeddings, items)
    else:
        gallery.add(encoded.embeddings, items)
    gallery.close()
    if target != out_dir:
        replace_directory(target, out_dir, database)
    return gallery


def open_for_update(
    out_dir: Path,
    bundle: Bundle,
    factory: str | None,
    max_index_memory: int | None,
    database: Database | None = None,
) -> GalleryIndex | None:
    """The existing index at out_dir (its items in the database if given) when it is of this
    bundle's model (kept within max_index_memory bytes from now on, when given), else None."""
    try:
        gallery = GalleryIndex.load(out_dir, bundle.fingerprint, factory=factory, database=database)
    except IndexMissing:
        return None
    except ModelMismatch:
        log.warning("the bundle changed since %s was built: rebuilding it from scratch", out_dir)
        return None
    if max_index_memory is not None:
        gallery.limit_memory(max_index_memory)
    return gallery


def new_collection(
    target: Path,
    bundle: Bundle,
    factory: str | None,
    max_index_memory: int | None,
    database: Database | None = None,
) -> GalleryIndex:
    """An empty collection at target for this bundle's embeddings (its items in the database if
    given), of the index kind factory names, else the one chosen by size within the memory."""
    return GalleryIndex.create(
        bundle.embedding_dim,
        bundle.fingerprint,
        target,
        factory,
        max_index_memory=max_index_memory,
        database=database,
    )


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the bundle and index (errors surface here, before the server starts) and serve.
    Writes are refused on a non-loopback host without an API key (see app/auth.py)."""
    settings = settings.model_copy(update={"host": host})
    service = load_service(settings)
    # One uvicorn worker (process): a second would load a second copy of the model and run its
    # own forwards with its own `threads`, so two layers of parallelism would fight over the
    # cores; one process with one batching inference worker keeps the cores on one forward.
    # Its event loop is left to uvicorn ("auto": uvloop); its HTTP protocol is httptools', with
    # a deadline on the headers. Both are imgsim's dependencies for the CPU they save per
    # request (see README "Serving under load").
    uvicorn.run(
        create_app(settings, service),
        host=host,
        port=port,
        log_level="info",
        http=headers_within(settings.header_timeout),
    )


def demo(workdir: Path, config: TrainConfig, host: str, port: int, serve_it: bool = True) -> Path:
    """Make a sample dataset, fine-tune on it, index it, and serve it; returns the bundle folder."""
    data_dir = make_sample_dataset(workdir / "data")
    bundle_dir = workdir / "bundle"
    bundle = train(data_dir, bundle_dir, config)
    index_folder(data_dir, bundle, BundleLayout(bundle_dir).index, workers=config.workers)
    example = next(iter(sorted((data_dir / "star").glob("*.png"))))
    print(
        f"\nimgsim demo: {bundle.config.backbone} fine-tuned on {data_dir}: val top-1 "
        f"{bundle.config.extra['val_top1']}; bundle and index in {bundle_dir}"
    )
    if not serve_it:
        print(f"  serve it with: imgsim serve --model {bundle_dir}")
        return bundle_dir
    url = f"http://{host}:{port}"
    print(
        f"imgsim demo: serving at {url} (API docs at {url}/docs)\n"
        f"  curl -F file=@{example} '{url}/classify?top_k=3'\n"
        f"  curl -F file=@{example} '{url}/similar?k=5'\n"
    )
    serve(Settings(bundle_dir=bundle_dir, device=config.device), host, port)
    return bundle_dir


def evaluate_folder(
    data_dir: Path,
    bundle_dir: Path,
    out_dir: Path | None = None,
    index_dir: Path | None = None,
    use_index: bool = True,
    knn_k: int = 5,
    target_precision: float = TARGET_PRECISION,
    batch_size: int = BATCH_SIZE,
    workers: int = WORKERS,
    device: str = "auto",
    runtime: str = "torch",
    database: Database | None = None,
) -> dict[str, Any]:
    """Evaluate a bundle on held-out class folders; write report.json and report.html.

    The gallery is index_dir, else BUNDLE/index when it exists or a database holds its items,
    else (or with use_index=False) the evaluation images themselves, each query leaving itself
    out.
    """
    bundle = Bundle.load(bundle_dir, device)
    bundle.use_runtime(runtime)
    images = list_eval_images(data_dir)
    if not images.paths:
        raise DatasetError(f"{data_dir} has no class subfolders with readable images to evaluate")
    probabilities, embeddings = bundle.classify(images.paths, batch_size, workers)
    layout = BundleLayout(bundle_dir)
    gallery_dir = index_dir or layout.index
    if use_index and (index_dir is not None or database is not None or gallery_dir.exists()):
        gallery = GalleryIndex.load(gallery_dir, bundle.fingerprint, database=database)
        try:
            neighbours = _gallery_neighbours(gallery, embeddings, images.paths, knn_k, gallery_dir)
        finally:
            gallery.close()
    else:
        neighbours = leave_one_out(embeddings, images.folders, knn_k)
    report = evaluate(
        probabilities,
        images.folders,
        bundle.config.classes,
        neighbours,
        knn_k=knn_k,
        target_precision=target_precision,
        threshold=bundle.config.threshold,
        bundle_info={
            "path": str(bundle_dir),
            "backbone": bundle.config.backbone,
            "fingerprint": bundle.fingerprint,
            "data": str(data_dir),
        },
    )
    history = json.loads(layout.metrics.read_text()) if layout.metrics.is_file() else None
    write_report(out_dir or layout.eval, report, history)
    return report


def _gallery_neighbours(
    gallery: GalleryIndex, embeddings: Any, paths: list[Path], knn_k: int, index_dir: Path
) -> Neighbours:
    """Each query's nearest gallery items, leaving out the item that is the query's own file."""
    counts = gallery.labels()
    found = gallery.search(embeddings, neighbours_needed(counts, knn_k))
    rows, in_gallery = [], []
    for path, hits in zip(paths, found, strict=True):
        own = str(path.resolve())
        kept = [hit for hit in hits if hit.path != own]
        rows.append(kept)
        in_gallery.append(len(kept) < len(hits))
    width = min(len(row) for row in rows)  # the same K for every query
    return Neighbours(
        labels=[[hit.label for hit in row[:width]] for row in rows],
        scores=np.array([[hit.score for hit in row[:width]] for row in rows], dtype=np.float32),
        in_gallery=np.array(in_gallery, dtype=bool),
        label_counts=counts,
        source=f"index {index_dir} ({len(gallery)} images)",
    )
