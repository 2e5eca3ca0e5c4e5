"""GET /: the page people use, rendered from the same records the JSON API answers with."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape

from app.dependencies import ServiceDep
from app.routes.classify import describe
from app.schemas import IndexInfo
from app.thumbnails import DEFAULT_SIZE
from models.imprint import MAX_NAME_LENGTH

router = APIRouter()
templates = Jinja2Templates(
    env=Environment(loader=PackageLoader("app", "templates"), autoescape=select_autoescape())
)
SHOWN_CLASSES = 50  # the panel lists this many class names, then says how many more


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page(request: Request, service: ServiceDep) -> HTMLResponse:
    """The page: search by image, browse, add and delete, and what is loaded."""
    gallery = service.gallery
    classes = service.bundle.config.classes
    return templates.TemplateResponse(
        request,
        "index.html",
        {
            "health": describe(service),
            "index": IndexInfo(**gallery.info()) if gallery is not None else None,
            "classes": classes[:SHOWN_CLASSES],
            "more_classes": max(0, len(classes) - SHOWN_CLASSES),
            "added_classes": service.classifier.added,
            "can_add_classes": service.classifier.can_imprint,
            "max_class_name": MAX_NAME_LENGTH,
            "duplicate_threshold": service.settings.duplicate_threshold,
            "thumbnail_size": DEFAULT_SIZE,
        },
    )
