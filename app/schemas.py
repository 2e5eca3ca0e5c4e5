"""Response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, computed_field


class Prediction(BaseModel):
    """One class and its probability."""

    label: str
    score: float = Field(description="softmax probability, 0..1")


class ClassifyResponse(BaseModel):
    """The top-k classes of an uploaded image, or "unknown" when the best is not confident."""

    label: str = Field(
        description='the best class, or "unknown" when its score is below the threshold'
    )
    unknown: bool = Field(description="true when the best score is below the threshold")
    threshold: float | None = Field(
        description="the confidence threshold applied (the request's, else the bundle's "
        "calibrated one); null: never unknown"
    )
    predictions: list[Prediction] = Field(description="the top-k classes, even when unknown")
    model: str = Field(description="fingerprint of the model that answered")
    method: Literal["classifier", "neighbours"] = Field(
        description="who answered: the classifier (trained and added classes) or a vote of "
        "the nearest labelled images"
    )
    classifier: str = Field(
        description="version of the classifier: the model's fingerprint, plus a hash of the "
        "added classes when there are any"
    )


class ClassInfo(BaseModel):
    """One class the classifier answers with."""

    name: str
    source: Literal["trained", "added"]
    examples: int | None = Field(description="images it was added from; null for a trained one")


class ClassList(BaseModel):
    """Every class, trained ones first."""

    classes: list[ClassInfo]
    classifier: str = Field(description="version of the classifier (see /classify)")


def file_url(item_id: int | None) -> str | None:
    """Where a stored image is fetched: GET /images/{id}/file (relative to the service)."""
    return None if item_id is None else f"/images/{item_id}/file"


def thumbnail_url(item_id: int | None) -> str | None:
    """Where a stored image's thumbnail is fetched (add ?size=N for another size)."""
    return None if item_id is None else f"/images/{item_id}/thumbnail"


class Linked(BaseModel):
    """A stored image's links: answers give ids and URLs, never the server's file paths."""

    id: int | None

    @computed_field(description="URL of the image file, relative to the service")
    @property
    def url(self) -> str | None:
        return file_url(self.id)

    @computed_field(description="URL of its thumbnail (?size=16..512)")
    @property
    def thumbnail_url(self) -> str | None:
        return thumbnail_url(self.id)


class Neighbour(Linked):
    """One similar image of the collection."""

    id: int
    label: str | None
    score: float = Field(description="cosine similarity, -1..1 (1 = same embedding)")


class SimilarResponse(BaseModel):
    """The k most similar images, best first."""

    neighbours: list[Neighbour]
    model: str


class Health(BaseModel):
    """What is being served."""

    status: str
    backbone: str
    classes: int
    device: str
    model: str
    index_size: int | None = Field(description="items in the index; null when none is loaded")
    image_size: int = Field(description="side of the square the model sees, in pixels")
    writes: str = Field(description="who may add and delete: 'key', 'open' or 'read-only'")
    unknown_threshold: UnknownThreshold = Field(
        description="below which top-1 score /classify answers 'unknown', and why"
    )
    added_classes: int = Field(description="classes added from examples (POST /classes)")
    classifier: str = Field(description="version of the classifier (see /classify)")


class UnknownThreshold(BaseModel):
    """The bundle's "unknown" threshold as training chose it, and what it gave on validation."""

    threshold: float | None = Field(description="null: /classify never answers 'unknown'")
    rule: str | None = Field(description="how training chose it (null: not recorded)")
    coverage: float | None = Field(description="share of val images answered at it")
    precision: float | None = Field(description="precision of those answers")


class Readiness(BaseModel):
    """The service can answer model requests."""

    status: str
    model: str = Field(description="fingerprint of the model loaded")
    index_size: int = Field(description="items in the gallery (0 before the first POST /images)")
    queue_depth: int = Field(description="images waiting for the model")


class ErrorBody(BaseModel):
    """Every 4xx answer."""

    detail: str


class Duplicate(BaseModel):
    """A stored image the new one nearly repeats."""

    id: int
    score: float = Field(description="cosine similarity, at least the duplicate threshold")


class AddedImage(Linked):
    """One image of POST /images."""

    id: int | None = Field(description="its new id; null when skipped as a duplicate")
    external_id: str | None
    label: str | None
    sha256: str
    duplicate_of: Duplicate | None = Field(
        description="the most similar image already stored, when it scores at least the "
        "duplicate threshold"
    )


class AddImagesResponse(BaseModel):
    """The images added, in upload order."""

    images: list[AddedImage]
    model: str


class ImageItem(Linked):
    """A stored image's metadata."""

    id: int
    external_id: str | None
    label: str | None
    sha256: str | None
    added_at: float = Field(description="Unix time it was added")


class ImagePage(BaseModel):
    """One page of the gallery, in the order images were added."""

    images: list[ImageItem]
    total: int = Field(description="images with this label (or in all), over every page")
    offset: int
    limit: int
    labels: dict[str, int] = Field(description="how many images carry each label ('' = none)")


class IndexInfo(BaseModel):
    """What the collection holds and how it is searched."""

    size: int
    index_type: str = Field(description="FAISS factory string, e.g. 'Flat' or 'HNSW32'")
    model: str = Field(description="fingerprint of the model the embeddings come from")
    dim: int
    last_change: int = Field(description="sequence number of the last add or delete applied")
    snapshot_change: int = Field(description="last change contained in the on-disk snapshot")
    search_params: dict[str, Any] = Field(description="tuned FAISS search settings")
    latest_change: int | None = Field(
        None,
        description="the latest change committed by any replica that this one knows of; null "
        "where no other process shares the collection (SQLite)",
    )
    lag_changes: int | None = Field(None, description="changes committed and not yet applied")
    lag_seconds: float | None = Field(
        None, description="how long this replica has known of a change it has not applied"
    )
    following: str | None = Field(
        None, description="'ok', or why this replica cannot follow the others' changes now"
    )
