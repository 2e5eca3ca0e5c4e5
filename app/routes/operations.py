"""GET /ready and GET /metrics: for the operator and the orchestrator, answered on the event
loop so that they stay fast while the model is busy."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.dependencies import BatcherDep, ServiceDep
from app.errors import NotReady
from app.metrics import CONTENT_TYPE
from app.routes import ERRORS
from app.schemas import Readiness

router = APIRouter()


@router.get("/ready", responses=ERRORS)
async def ready(service: ServiceDep, batcher: BatcherDep) -> Readiness:
    """200 when the model is loaded, its worker takes requests and there is a gallery (loaded,
    or a folder where POST /images starts one); else 503 saying what is missing."""
    if not batcher.running:
        raise NotReady("the inference worker is not running")
    gallery = service.gallery
    if gallery is None and service.settings.resolved_index_dir() is None:
        raise NotReady("no index is loaded or configured: start the service with --index DIR")
    if service.follower is not None and (problem := service.follower.state().problem):
        raise NotReady(f"cannot follow the other replicas' changes: {problem}", retry_after=2)
    return Readiness(
        status="ready",
        model=service.bundle.fingerprint,
        index_size=len(gallery) if gallery is not None else 0,
        queue_depth=batcher.depth,
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text format): requests, latency, batching, queue, model, index."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
