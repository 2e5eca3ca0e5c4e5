"""POST /explain: a PNG heatmap of why the model answered as it did."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from PIL import Image

from app.dependencies import ImageDep, ServiceDep
from app.errors import InvalidRequest
from app.routes import ERRORS, NeighbourId
from models.explain import Heatmap, png, side_by_side

router = APIRouter()

PNG = {200: {"content": {"image/png": {}}, "description": "the heatmap overlay"}}


@router.post("/explain", responses={**ERRORS, **PNG}, response_class=Response)
def explain(
    service: ServiceDep,
    image: ImageDep,
    label: Annotated[
        str | None, Query(description="explain this class instead of the predicted one")
    ] = None,
    neighbour_id: NeighbourId = None,
    style: Annotated[
        Literal["overlay", "heat"],
        Query(description="overlay: the heat in colour over the image; heat: the heat alone, grey"),
    ] = "overlay",
) -> Response:
    """A PNG heatmap over the upload (multipart field 'file') as the model sees it: the regions
    that drove the predicted class (or `label`); with neighbour_id, the upload and that stored
    image side by side, each with the regions that make it similar to the other."""
    explainer = service.explainer
    if neighbour_id is not None:
        stored = service.image_file(neighbour_id)[0]
        other = service.bundle.decode(stored, service.settings.max_pixels)
        query, neighbour, score = explainer.for_pair(image, other)
        overlay = side_by_side(_drawn(query, style), _drawn(neighbour, style))
        headers = {"X-Imgsim-Score": f"{score:.4f}", "X-Imgsim-Neighbour": str(neighbour_id)}
        return Response(png(overlay), media_type="image/png", headers=headers)
    classes = service.bundle.config.classes
    if label is not None and label not in classes:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise InvalidRequest(f"the model has no class {label!r} (its classes: {shown})")
    heatmap, index = explainer.for_class(image, None if label is None else classes.index(label))
    headers = {"X-Imgsim-Label": classes[index].encode("ascii", "replace").decode()}
    return Response(png(_drawn(heatmap, style)), media_type="image/png", headers=headers)


def _drawn(heatmap: Heatmap, style: str) -> Image.Image:
    return heatmap.overlay() if style == "overlay" else heatmap.grey()
