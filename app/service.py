"""What the service holds once started: the bundle and, when there is one, its gallery index."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.settings import Settings
from index.gallery import GalleryIndex
from models.bundle import Bundle

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The loaded model and index; built once at startup."""

    settings: Settings
    bundle: Bundle
    gallery: GalleryIndex | None


def load_service(settings: Settings) -> Service:
    """Load the bundle (or the pretrained backbone) and its index, refusing a mismatched index."""
    if settings.bundle_dir is not None:
        bundle = Bundle.load(settings.bundle_dir, settings.device)
    else:
        bundle = Bundle.pretrained(settings.backbone, settings.weights, settings.device)
    index_dir = settings.resolved_index_dir()
    gallery = None
    if settings.index_dir is not None or (index_dir is not None and index_dir.exists()):
        gallery = GalleryIndex.load(index_dir, bundle.fingerprint)
    log.info(
        "serving %s (%s, %d classes) on %s; index: %s",
        bundle.config.backbone,
        bundle.fingerprint,
        len(bundle.config.classes),
        bundle.device,
        f"{len(gallery)} items" if gallery is not None else "none",
    )
    return Service(settings, bundle, gallery)
