"""Response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Prediction(BaseModel):
    """One class and its probability."""

    label: str
    score: float = Field(description="softmax probability, 0..1")


class ClassifyResponse(BaseModel):
    """The top-k classes of an uploaded image."""

    label: str = Field(description="the best class")
    predictions: list[Prediction]
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


class ErrorBody(BaseModel):
    """Every 4xx answer."""

    detail: str
