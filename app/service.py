"""What the service holds once started: the bundle and, when there is one, its gallery index."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from app.errors import ImageFileMissing, NoIndex
from app.settings import Settings
from app.thumbnails import Thumbnails
from index.errors import IndexMissing, ItemNotFound
from index.follower import ChangeFollower
from index.gallery import GalleryIndex
from index.store import Item
from models import imprint
from models.bundle import Bundle
from models.explain import Explainer
from models.imprint import AddedClass, Classifier

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The loaded model and index; built once at startup."""

    settings: Settings
    bundle: Bundle
    gallery: GalleryIndex | None
    thumbnails: Thumbnails = field(default_factory=Thumbnails, repr=False)
    _creating: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _changing_classes: threading.Lock = field(default_factory=threading.Lock, repr=False)
    classifier: Classifier = field(init=False)  # trained and added classes
    follower: ChangeFollower | None = field(default=None, init=False)  # of the other replicas

    def __post_init__(self) -> None:
        bundle = self.bundle
        trained = Classifier.of(bundle.config.classes, bundle.net.classifier, bundle.fingerprint)
        kept = imprint.load(self.gallery.added_classes()) if self.gallery is not None else []
        self.classifier = trained.replaced(kept)  # replaced whole on a change: read lock-free
        self._follow()

    def _follow(self) -> None:
        """Keep the index up with the other replicas' writes, where the database is shared."""
        if self.gallery is not None and self.gallery.store.shared and self.follower is None:
            self.follower = ChangeFollower(self.gallery, self._classes_changed)
            self.follower.start()

    def _classes_changed(self, text: str | None) -> None:
        """Serve the added classes another replica kept with the collection."""
        with self._changing_classes:
            self.classifier = self.classifier.replaced(imprint.load(text))
        log.info("the added classes changed on another replica: now %d", len(self.classifier.added))

    def change_classes(self, change: Callable[[Classifier], list[AddedClass]]) -> Classifier:
        """The added classes as change makes them from the current ones, kept with the
        collection (durably, before they answer), then served."""
        with self._changing_classes:
            gallery = self.collection()
            if gallery is None:
                raise NoIndex(
                    "added classes are kept with the collection, and none is configured: "
                    "start the service with --index DIR"
                )
            # as kept now: another replica may have changed them since this one last looked
            self.classifier = self.classifier.replaced(imprint.load(gallery.added_classes()))
            added = imprint.fit_in(self.classifier, change(self.classifier), gallery)
            gallery.keep_added_classes(imprint.dump(added))
            self.classifier = self.classifier.replaced(added)
            return self.classifier

    @cached_property
    def explainer(self) -> Explainer:
        """Grad-CAM on a private copy of the network, made on the first /explain."""
        return Explainer(self.bundle)

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
                    database=self.settings.database(),
                    uploads=self.settings.uploads_url,
                )
                self._follow()
        return self.gallery

    def image_file(self, item_id: int) -> tuple[Path, Item]:
        """A stored image's file and item; ItemNotFound or ImageFileMissing when there is none."""
        if self.gallery is None:
            raise ItemNotFound(f"there is no image with id {item_id}")
        item = self.gallery.get(item_id)
        path = self.gallery.image_file(item)
        if not path.is_file():
            raise ImageFileMissing(f"the image file of id {item_id} is no longer on disk")
        return path, item

    def close(self) -> None:
        """Stop following, snapshot and close the gallery (call at shutdown)."""
        if self.follower is not None:
            self.follower.stop()
        if self.gallery is not None:
            self.gallery.close()


def single_threaded_torch() -> None:
    """torch in this thread, and in every thread that has not run a torch op yet, runs on one
    intra-op thread: only the inference worker's thread may start an OpenMP team (see
    app/batching.py)."""
    torch.set_num_threads(1)


def load_service(settings: Settings) -> Service:
    """Load the bundle (or the pretrained backbone) and its index, refusing a mismatched index.
    torch runs on one thread here: only the inference worker's thread may start an OpenMP team
    (app/batching.py)."""
    if settings.database() is not None and settings.resolved_index_dir() is None:
        raise ValueError(
            "a database keeps the items, but their FAISS snapshots and uploaded images need a "
            "folder: give a bundle, or an index folder (IMGSIM_INDEX_DIR, --index)"
        )
    single_threaded_torch()
    if settings.bundle_dir is not None:
        bundle = Bundle.load(settings.bundle_dir, settings.device)
    else:
        bundle = Bundle.pretrained(settings.backbone, settings.weights, settings.device)
    bundle.use_runtime(settings.runtime, settings.threads)
    gallery = stored_gallery(settings, bundle)
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


def stored_gallery(settings: Settings, bundle: Bundle) -> GalleryIndex | None:
    """The collection to serve: the index folder's, or None when there is none yet and none was
    asked for by name (one is then made on the first add). With a database, the database's:
    made empty when there is none, so that replicas started together serve one collection."""
    index_dir, database = settings.resolved_index_dir(), settings.database()
    fingerprint = bundle.fingerprint
    if index_dir is None:
        return None
    if settings.index_dir is None and database is None and not index_dir.exists():
        return None
    try:
        return _loaded(settings, index_dir, fingerprint)
    except IndexMissing:
        if database is None:
            raise
    try:
        log.info("%s holds no collection: starting an empty one", database)
        created = GalleryIndex.create(
            bundle.embedding_dim,
            fingerprint,
            index_dir,
            factory=settings.index_factory,
            database=database,
            uploads=settings.uploads_url,
        )
        created.close()
    except FileExistsError:
        pass  # another replica made it meanwhile
    return _loaded(settings, index_dir, fingerprint)


def _loaded(settings: Settings, index_dir: Path, fingerprint: str) -> GalleryIndex:
    return GalleryIndex.load(
        index_dir,
        fingerprint,
        factory=settings.index_factory,
        snapshot_every=settings.snapshot_every,
        thorough_check=settings.thorough_index_check,
        database=settings.database(),
        uploads=settings.uploads_url,
    )
