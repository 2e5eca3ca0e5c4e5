"""GET /health and POST /classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.auth import write_policy
from app.dependencies import QueryImageDep, ServiceDep
from app.routes import ERRORS
from app.schemas import ClassifyResponse, Health, Prediction, UnknownThreshold
from app.service import Service

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
) -> ClassifyResponse:
    """The top_k most probable classes of the uploaded image (multipart field 'file'); the
    label is "unknown" when the best probability is below the threshold."""
    probabilities = query.encoded.probabilities()
    classes = service.bundle.config.classes
    order = probabilities[0].argsort()[::-1][:top_k]
    predictions = [Prediction(label=classes[i], score=float(probabilities[0, i])) for i in order]
    if threshold is None:
        threshold = service.bundle.config.threshold
    unknown = threshold is not None and predictions[0].score < threshold
    return ClassifyResponse(
        label=UNKNOWN if unknown else predictions[0].label,
        unknown=unknown,
        threshold=threshold,
        predictions=predictions,
        model=service.bundle.fingerprint,
    )
