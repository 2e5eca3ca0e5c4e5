"""The HTTP floor of the product's stack: uvicorn and FastAPI, run as `imgsim serve` runs them,
answering POST /classify (multipart field 'file', read whole) with an answer of the size of
imgsim's, and nothing of imgsim's: no middleware, no decoding thread, no model.

benchmarks/serve_load.py serves the same uploads to it, so that what a request costs in the
stack the product is built on (HTTP parsing, multipart, the answer's validation and JSON, the
access log) is measured rather than assumed, apart from what imgsim adds to it.

    python -m benchmarks.http_floor --port 8001
"""

from __future__ import annotations

import argparse
from typing import Annotated

import uvicorn
from fastapi import FastAPI, File, UploadFile

from app.schemas import ClassifyResponse, Health, Prediction

TOP_K = 5  # /classify's default top_k: the answer's size


def create_app(classes: int = 16) -> FastAPI:
    """POST /classify, answered with fixed predictions over `classes` class names; GET /health."""
    app = FastAPI(title="imgsim HTTP floor")
    labels = [f"class-{i:02d}" for i in range(classes)]

    @app.get("/health")
    async def health() -> Health:
        return Health(
            status="ok",
            backbone="none",
            classes=classes,
            device="cpu",
            model="0" * 16,
            index_size=None,
            image_size=0,
            writes="read-only",
        )

    @app.post("/classify")
    async def classify(file: Annotated[UploadFile, File()]) -> ClassifyResponse:
        await file.read()
        predictions = [Prediction(label=labels[i], score=0.1 + 0.01 * i) for i in range(TOP_K)]
        return ClassifyResponse(
            label=predictions[0].label,
            unknown=False,
            threshold=0.5,
            predictions=predictions,
            model="0" * 16,
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")  # as app.stages


if __name__ == "__main__":
    main()
