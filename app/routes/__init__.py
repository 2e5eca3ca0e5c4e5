"""HTTP routes, one module per concern."""

from typing import Annotated

from fastapi import Path, Query

from app.schemas import ErrorBody

ID_RANGE = {"ge": 0, "le": 2**63 - 1}  # FAISS and SQLite ids are signed 64-bit
ItemId = Annotated[int, Path(description="the image's id", **ID_RANGE)]
NeighbourId = Annotated[
    int | None,
    Query(description="explain the similarity to this stored image instead of a class", **ID_RANGE),
]

ERROR_CODES = (400, 401, 403, 404, 408, 409, 413, 415, 422, 503, 507)
ERRORS = {code: {"model": ErrorBody} for code in ERROR_CODES}
