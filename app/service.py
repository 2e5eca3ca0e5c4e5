"""What the service holds once started: the bundle and, when there is one, its gallery index."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

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
    _creating: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def collection(self) -> GalleryIndex | None:
        """The gallery to add to, created empty at the index folder on the first add."""
        if self.gallery is not None:
            return self.gallery
        directory = self.settings.resolved_index_dir()
        if directory is None:
            return None
        with self._creating:
            if self.gallery is None:
                log.info("starting a new collection at %s", directory)
                self.gallery = GalleryIndex.create(
                    self.bundle.embedding_dim,
                    self.bundle.fingerprint,
                    directory,
                    factory=self.settings.index_factory,
                    snapshot_every=self.settings.snapshot_every,
                )
        return self.gallery

    def close(self) -> None:
        """Snapshot and close the gallery (call at shutdown)."""
        if self.gallery is not None:
            self.gallery.close()


def load_service(settings: Settings) -> Service:
    """Load the bundle (or the pretrained backbone) and its index, refusing a mismatched index."""
    if settings.bundle_dir is not None:
        bundle = Bundle.load(settings.bundle_dir, settings.device)
    else:
        bundle = Bundle.pretrained(settings.backbone, settings.weights, settings.device)
    bundle.use_runtime(settings.runtime)
    index_dir = settings.resolved_index_dir()
    gallery = None
    if settings.index_dir is not None or (index_dir is not None and index_dir.exists()):
        gallery = GalleryIndex.load(
            index_dir,
            bundle.fingerprint,
            factory=settings.index_factory,
            snapshot_every=settings.snapshot_every,
        )
    log.info(
        "serving %s (%s, %d classes) on %s with %s; index: %s",
        bundle.config.backbone,
        bundle.fingerprint,
        len(bundle.config.classes),
        bundle.device,
        bundle.runtime.name,
        f"{len(gallery)} items" if gallery is not None else "none",
    )
    return Service(settings, bundle, gallery)
