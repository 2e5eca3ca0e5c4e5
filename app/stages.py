"""The stages the CLI drives, as plain functions: train, index, serve, demo."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import uvicorn

from app.main import create_app
from app.service import load_service
from app.settings import Settings
from index.gallery import GalleryIndex
from models.bundle import Bundle
from models.data import check_images, find_images, label_of
from models.errors import DatasetError, WeightsUnavailable
from models.samples import make_sample_dataset
from models.training import TrainConfig, train

log = logging.getLogger(__name__)


def index_folder(
    gallery_dir: Path, bundle: Bundle, out_dir: Path, batch_size: int = 32, workers: int = 2
) -> GalleryIndex:
    """Embed every readable image below gallery_dir into a new index written to out_dir."""
    paths = find_images(gallery_dir) if gallery_dir.is_dir() else []
    if not paths:
        raise DatasetError(
            f"{gallery_dir} holds no images ({', '.join(['.jpg', '.png', '.webp', '...'])}); "
            "pass the folder of images to index."
        )
    good, _ = check_images(paths)
    embeddings = bundle.embed_files(good, batch_size=batch_size, workers=workers)
    gallery = GalleryIndex.create(bundle.embedding_dim, bundle.fingerprint)
    root = gallery_dir.resolve()
    gallery.add(
        embeddings,
        [str(path.resolve()) for path in good],
        [label_of(path.resolve(), root) for path in good],
    )
    gallery.save(out_dir)
    return gallery


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the bundle and index (errors surface here, before the server starts) and serve."""
    service = load_service(settings)
    uvicorn.run(create_app(settings, service), host=host, port=port, log_level="info")


def demo(workdir: Path, config: TrainConfig, host: str, port: int, serve_it: bool = True) -> Path:
    """Make a sample dataset, train briefly, index it, and serve it; returns the bundle folder."""
    data_dir = make_sample_dataset(workdir / "data")
    bundle_dir = workdir / "bundle"
    try:
        bundle = train(data_dir, bundle_dir, config)
    except WeightsUnavailable:
        if config.weights != "imagenet":
            raise
        print(
            f"imgsim demo: ImageNet weights for {config.backbone} are not available (offline, "
            "nothing cached), so the demo trains from scratch."
        )
        bundle = train(data_dir, bundle_dir, replace(config, weights="none"))
    index_folder(data_dir, bundle, bundle_dir / "index", workers=config.workers)
    example = next(iter(sorted((data_dir / "star").glob("*.png"))))
    url = f"http://{host}:{port}"
    print(
        f"\nimgsim demo: serving {bundle_dir} at {url} (API docs at {url}/docs)\n"
        f"  curl -F file=@{example} '{url}/classify?top_k=3'\n"
        f"  curl -F file=@{example} '{url}/similar?k=5'\n"
    )
    if serve_it:
        serve(Settings(bundle_dir=bundle_dir, device=config.device), host, port)
    return bundle_dir
