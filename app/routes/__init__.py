"""HTTP routes, one module per concern."""

from app.schemas import ErrorBody

ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 422, 503)}
