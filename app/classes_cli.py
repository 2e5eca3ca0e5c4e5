"""`imgsim classes`: the classes added from examples, offline (the same as POST /classes)."""

from __future__ import annotations

from pathlib import Path

from index.database import Database
from index.gallery import GalleryIndex
from models import imprint
from models.bundle import Bundle
from models.config import BATCH_SIZE, WORKERS
from models.data import listing, scan_images
from models.errors import DatasetError
from models.imprint import Classifier, added_from, checked_name
from models.layout import BundleLayout


def change_classes(
    action: str,
    bundle_dir: Path,
    index_dir: Path | None = None,
    name: str | None = None,
    folder: Path | None = None,
    workers: int = WORKERS,
    database: Database | None = None,
) -> Classifier:
    """add NAME from the images below folder, add examples to NAME, or remove NAME, in the
    collection at index_dir (default BUNDLE/index; its items in the database if given); list
    changes nothing. A server of that collection sees the change once restarted."""
    bundle = Bundle.load(bundle_dir)
    index_dir = index_dir or BundleLayout(bundle_dir).index
    gallery = GalleryIndex.load(index_dir, bundle.fingerprint, database=database)
    try:
        trained = Classifier.of(bundle.config.classes, bundle.net.classifier, bundle.fingerprint)
        current = trained.replaced(imprint.load(gallery.added_classes()))
        if action == "list":
            return current
        assert name is not None
        found = current.find(name)
        if action == "add" and found is None:
            if not len(gallery):
                raise DatasetError(
                    "a new class is placed against the images of the collection, and it holds "
                    "none yet: run 'imgsim index' first, then add the class."
                )
            if not current.can_imprint:
                raise DatasetError(
                    f"{bundle_dir} has the pretrained ImageNet classifier (a linear head), whose "
                    "classes cannot be joined by examples. Train a bundle with 'imgsim train'."
                )
            try:
                name = checked_name(name, current.names)
            except ValueError as err:
                raise DatasetError(f"{err}. Choose another name.") from None
        elif found is None:
            known = ", ".join(c.name for c in current.added) or "none"
            raise DatasetError(f"there is no added class named {name!r} (added: {known}).")
        if action == "remove":
            added = [c for c in current.added if c is not found]
        else:
            embeddings = _embeddings(bundle, folder, workers)
            if found is None:
                centre = gallery.mean_embedding()
                added = [*current.added, added_from(name, embeddings, centre)]
            else:
                added = [c.with_examples(embeddings) if c is found else c for c in current.added]
        added = imprint.fit_in(current, added, gallery)
        gallery.keep_added_classes(imprint.dump(added))
        return current.replaced(added)
    finally:
        gallery.close()


def _embeddings(bundle: Bundle, folder: Path | None, workers: int):
    """The unit embeddings of the readable images below folder."""
    paths, skipped = scan_images(folder) if folder is not None and folder.is_dir() else ([], [])
    bundle.use_runtime("auto")
    encoded = bundle.encode(paths, BATCH_SIZE, workers, skip_unreadable=True)
    if not len(encoded.embeddings):
        problems = skipped + [(paths[i], why) for i, why in encoded.failed]
        raise DatasetError(
            f"{folder} holds no image that can be read"
            + (f" ({listing(problems)})" if problems else "")
            + ". Pass a folder of example images of the class."
        )
    return encoded.embeddings
