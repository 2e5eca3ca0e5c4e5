"""Response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


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


class Neighbour(BaseModel):
    """One similar image of the collection."""

    id: int
    label: str | None
    path: str
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


class AddedImage(BaseModel):
    """One image of POST /images."""

    id: int | None = Field(description="its new id; null when skipped as a duplicate")
    external_id: str | None
    label: str | None
    path: str | None = Field(description="where the service keeps the image; null when skipped")
    sha256: str
    duplicate_of: Duplicate | None = Field(
        description="the most similar image already stored, when it scores at least the "
        "duplicate threshold"
    )


class AddImagesResponse(BaseModel):
    """The images added, in upload order."""

    images: list[AddedImage]
    model: str


class ImageItem(BaseModel):
    """A stored image's metadata."""

    id: int
    external_id: str | None
    label: str | None
    path: str
    sha256: str | None
    added_at: float = Field(description="Unix time it was added")


class IndexInfo(BaseModel):
    """What the collection holds and how it is searched."""

    size: int
    index_type: str = Field(description="FAISS factory string, e.g. 'Flat' or 'HNSW32'")
    model: str = Field(description="fingerprint of the model the embeddings come from")
    dim: int
    last_change: int = Field(description="sequence number of the last add or delete applied")
    snapshot_change: int = Field(description="last change contained in the on-disk snapshot")
    search_params: dict[str, Any] = Field(description="tuned FAISS search settings")
