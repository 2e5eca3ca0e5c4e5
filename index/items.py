"""The reads of a collection that its item store answers alone, without FAISS or its lock:
items by id or a page at a time, content hashes, labels, the mean embedding, a sample of the
labelled embeddings, the added classes.
GalleryIndex (index/gallery.py) is one."""

from __future__ import annotations

import numpy as np

from index.errors import ItemNotFound, ModelMismatch
from index.store import BaseItemStore, Item

ADDED_CLASSES = "added_classes"  # the meta key of the classes added from examples


class StoredItems:
    """A collection's items as its store holds them."""

    store: BaseItemStore
    fingerprint: str  # of the model the embeddings come from

    @property
    def dim(self) -> int:
        """Embedding size."""
        raise NotImplementedError

    def get(self, item_id: int) -> Item:
        """The stored item of that id."""
        item = self.store.get(item_id)
        if item is None:
            raise ItemNotFound(f"there is no image with id {item_id}")
        return item

    def page(
        self, label: str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[Item], int]:
        """Stored items in the order they were added, a page at a time, optionally only those
        with a label ('' = without one); and how many match in all."""
        return self.store.page(label, offset, limit)

    def ids_of_content(self, sha256: str) -> list[int]:
        """The ids of items whose image has this content hash."""
        return [int(i) for i in self.store.ids(sha256=sha256)]

    def known_contents(self) -> set[str]:
        """The content hashes of every item."""
        return self.store.sha256s()

    def mean_embedding(self) -> np.ndarray:
        """The mean of every stored embedding (float64; zeros when there are none)."""
        return self.store.mean_embedding(self.dim)

    def labelled_sample(self, images: int) -> tuple[np.ndarray, np.ndarray]:
        """The labels and embeddings of about `images` labelled items, as many of each label
        (those first added): what new classes' rows are fitted against (models/imprint.py)."""
        labels = [label for label in self.labels() if label is not None]
        return self.store.labelled_sample(self.dim, max(1, images // max(len(labels), 1)))

    def added_classes(self) -> str | None:
        """The classes added from examples (models/imprint.py's JSON), kept with the collection
        so that they follow it: a restart, a backup, every process that opens it."""
        return self.store.meta().get(ADDED_CLASSES)

    def contents_by_path(self) -> dict[str, str | None]:
        """Each item's path with its content hash."""
        return self.store.contents_by_path()

    def labels(self) -> dict[str | None, int]:
        """How many items carry each label."""
        return self.store.labels()

    def check_model(self, fingerprint: str) -> None:
        """Raise ModelMismatch unless the index was built with the model of this fingerprint."""
        if fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"the index was built with model {self.fingerprint}, not with the model being "
                f"served ({fingerprint}); rebuild it with 'imgsim index GALLERY_DIR --model BUNDLE'"
            )
