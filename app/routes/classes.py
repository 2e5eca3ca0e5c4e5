"""Classes added from a few examples, without retraining (models/imprint.py): GET /classes,
POST /classes, POST /classes/{name}/examples and DELETE /classes/{name}."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Path, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.auth import require_writer
from app.dependencies import BatcherDep, ServiceDep, read_upload
from app.errors import ClassConflict, ClassNotFound, InvalidRequest
from app.routes import ERRORS
from app.schemas import ClassInfo, ClassList
from app.service import Service
from index.errors import ItemNotFound
from models.imprint import MAX_NAME_LENGTH, AddedClass, Classifier, added_from, checked_name

router = APIRouter()

WRITER = [Depends(require_writer)]
# A new row is centred on the collection's mean embedding (models/imprint.py): without images
# there is no centre, and a raw mean would take every answer.
NO_CENTRE = (
    "a new class is placed against the images of the collection, and it holds none yet: add "
    "images first (POST /images or 'imgsim index'), then the class"
)
ClassName = Annotated[str, Path(description="the class's name", max_length=MAX_NAME_LENGTH)]
Files = Annotated[list[UploadFile] | None, File(description="example images")]
Ids = Annotated[list[int] | None, Form(description="ids of stored images to take as examples")]


def _listing(classifier: Classifier) -> ClassList:
    trained = [ClassInfo(name=n, source="trained", examples=None) for n in classifier.trained]
    added = [ClassInfo(name=c.name, source="added", examples=c.examples) for c in classifier.added]
    return ClassList(classes=trained + added, classifier=classifier.version)


@router.get("/classes", responses=ERRORS)
async def list_classes(service: ServiceDep) -> ClassList:
    """Every class /classify answers with: the trained ones, then those added from examples
    with how many."""
    return _listing(service.classifier)


@router.post("/classes", status_code=201, responses=ERRORS, dependencies=WRITER)
async def add_class(
    service: ServiceDep,
    batcher: BatcherDep,
    name: Annotated[str, Form(description="the new class's name")],
    files: Files = None,
    ids: Ids = None,
) -> ClassList:
    """Add a class from example images (multipart fields 'files') and/or stored images
    ('ids'): its classifier row is the mean of their embeddings less the collection's,
    normalised. /classify answers with it from the next request; the embeddings, so the index,
    do not change."""
    if not service.classifier.can_imprint:
        raise ClassConflict(
            "this bundle's classifier is the pretrained ImageNet one (a linear head), whose "
            "classes cannot be joined by examples: train a bundle with 'imgsim train', or "
            "classify with /classify?by=neighbours"
        )
    gallery = service.gallery
    if gallery is None or not len(gallery):
        raise ClassConflict(NO_CENTRE)
    embeddings = await _examples(service, batcher, files, ids)
    centre = await run_in_threadpool(gallery.mean_embedding)

    def change(current: Classifier) -> list[AddedClass]:
        try:
            checked = checked_name(name, current.names)
        except ValueError as err:
            exists = any(n == name.strip() for n in current.names)
            raise (ClassConflict if exists else InvalidRequest)(str(err)) from None
        return [*current.added, added_from(checked, embeddings, centre)]

    return _listing(await run_in_threadpool(service.change_classes, change))


@router.post("/classes/{name}/examples", responses=ERRORS, dependencies=WRITER)
async def add_examples(
    service: ServiceDep,
    batcher: BatcherDep,
    name: ClassName,
    files: Files = None,
    ids: Ids = None,
) -> ClassList:
    """Add examples to an added class: its row becomes the mean of all its examples."""
    _added(service.classifier, name)  # refused before the images are read
    embeddings = await _examples(service, batcher, files, ids)

    def change(current: Classifier) -> list[AddedClass]:
        found = _added(current, name)
        return [c.with_examples(embeddings) if c is found else c for c in current.added]

    return _listing(await run_in_threadpool(service.change_classes, change))


@router.delete("/classes/{name}", status_code=204, responses=ERRORS, dependencies=WRITER)
async def delete_class(service: ServiceDep, name: ClassName) -> Response:
    """Remove an added class (a trained one cannot be: 409)."""

    def change(current: Classifier) -> list[AddedClass]:
        found = _added(current, name)
        return [c for c in current.added if c is not found]

    await run_in_threadpool(service.change_classes, change)
    return Response(status_code=204)


def _added(classifier: Classifier, name: str) -> AddedClass:
    """The added class of that name; 409 for a trained one, 404 for none."""
    if name in classifier.trained:
        raise ClassConflict(f"{name!r} is a trained class: only added classes can change")
    found = classifier.find(name)
    if found is None:
        raise ClassNotFound(f"there is no class named {name!r}")
    return found


async def _examples(
    service: Service, batcher: BatcherDep, files: list[UploadFile] | None, ids: list[int] | None
) -> np.ndarray:
    """The unit embeddings of the uploads (through the model) and of the stored ids."""
    files, ids = files or [], ids or []
    if not files and not ids:
        raise InvalidRequest("a class needs examples: send images as 'files' or ids as 'ids'")
    parts = [np.zeros((0, service.bundle.embedding_dim), np.float32)]
    if files:
        uploads = await batcher.prepared(
            lambda: [read_upload(service, file) for file in files], len(files)
        )
        parts.append((await batcher.encode([u.pixels for u in uploads])).embeddings)
    if ids:
        parts.append(await run_in_threadpool(_stored, service, ids))
    return np.concatenate(parts)


def _stored(service: Service, ids: list[int]) -> np.ndarray:
    """The stored embeddings of these ids, in order; ItemNotFound naming any missing."""
    if service.gallery is None:
        raise ItemNotFound(f"there is no image with id {ids[0]}")
    found: dict[int, np.ndarray] = {}
    for chunk_ids, vectors in service.gallery.store.embeddings(
        service.gallery.dim, np.asarray(ids, dtype=np.int64)
    ):
        found.update(zip(chunk_ids.tolist(), vectors, strict=True))
    missing = [i for i in ids if i not in found]
    if missing:
        raise ItemNotFound(f"there is no image with id {', '.join(map(str, missing))}")
    return np.stack([found[i] for i in ids])
