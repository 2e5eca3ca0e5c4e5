"""GET /health and POST /classify."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from app.auth import write_policy
from app.dependencies import QueryImage, QueryImageDep, ServiceDep
from app.errors import NoIndex
from app.routes import ERRORS
from app.schemas import ClassifyResponse, Health, Prediction, UnknownThreshold
from app.service import Service
from index.errors import EmptyIndex
from models.imprint import neighbour_vote

router = APIRouter()


@router.get("/health")
async def health(service: ServiceDep) -> Health:
    """What is served: backbone, number of classes, device, model fingerprint, index size.
    Liveness: answered on the event loop, in milliseconds even while the model is busy."""
    return describe(service)


def describe(service: Service) -> Health:
    """What is served, as /health answers it (the page shows the same record)."""
    bundle, gallery = service.bundle, service.gallery
    calibration = bundle.config.extra.get("unknown_threshold", {})  # none before it was kept
    return Health(
        status="ok",
        backbone=bundle.config.backbone,
        classes=len(bundle.config.classes),
        device=bundle.device,
        model=bundle.fingerprint,
        index_size=len(gallery) if gallery is not None else None,
        image_size=bundle.config.preprocessing.crop_size,
        writes=write_policy(service.settings),
        unknown_threshold=UnknownThreshold(
            threshold=bundle.config.threshold,
            rule=calibration.get("rule"),
            coverage=calibration.get("coverage"),
            precision=calibration.get("precision"),
        ),
        added_classes=len(service.classifier.added),
        classifier=service.classifier.version,
    )


UNKNOWN = "unknown"


@router.post("/classify", responses=ERRORS)
async def classify(
    service: ServiceDep,
    query: QueryImageDep,
    top_k: Annotated[int, Query(ge=1, le=100)] = 5,
    threshold: Annotated[
        float | None,
        Query(
            ge=0.0,
            le=1.0,
            description="answer unknown below this top score; default: the bundle's calibrated "
            "threshold",
        ),
    ] = None,
    by: Annotated[
        Literal["classifier", "neighbours"],
        Query(
            description="classifier: the trained and added classes; neighbours: a "
            "similarity-weighted vote of the k nearest images of the collection"
        ),
    ] = "classifier",
    k: Annotated[int, Query(ge=1, le=100, description="neighbours that vote (by=neighbours)")] = 10,
) -> ClassifyResponse:
    """The top_k most probable classes of the uploaded image (multipart field 'file'); the
    label is "unknown" when the best probability is below the threshold (by=neighbours: the
    best share of the vote, below the threshold given, if any)."""
    classifier = service.classifier
    if by == "neighbours":
        scores = await run_in_threadpool(_vote, service, query, k)  # no calibrated threshold
    else:
        probabilities = classifier.probabilities(query.encoded.logits, query.encoded.embeddings)[0]
        scores = dict(zip(classifier.names, probabilities.tolist(), strict=True))
        if threshold is None:
            threshold = service.bundle.config.threshold
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])[:top_k]
    predictions = [Prediction(label=label, score=score) for label, score in ranked]
    unknown = threshold is not None and predictions[0].score < threshold
    return ClassifyResponse(
        label=UNKNOWN if unknown else predictions[0].label,
        unknown=unknown,
        threshold=threshold,
        predictions=predictions,
        model=service.bundle.fingerprint,
        method=by,
        classifier=classifier.version,
    )


def _vote(service: Service, query: QueryImage, k: int) -> dict[str, float]:
    """Each label's share of the similarity to the upload of the k nearest images (those
    without a label do not vote)."""
    if service.gallery is None:
        raise NoIndex("by=neighbours votes among the collection's images, and none is loaded")
    found = service.gallery.search(query.encoded.embeddings, k)[0]
    scores = neighbour_vote([n.label for n in found], [n.score for n in found])
    if not scores:
        raise EmptyIndex("the collection holds no labelled image to vote: add some with a label")
    return scores
