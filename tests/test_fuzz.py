"""Property-based fuzzing of every operation in the OpenAPI schema: whatever a client sends
(ids out of range, wrong types, garbage files, missing fields, odd content types), the answer
is never a 5xx and every error is JSON with a readable detail."""

from __future__ import annotations

import io
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.main import create_app
from app.settings import Settings
from app.stages import index_folder
from models.bundle import Bundle

REQUESTS = 1000


@pytest.fixture(scope="module")
def client(
    trained_bundle_dir: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    index_dir = tmp_path_factory.mktemp("fuzz") / "index"
    index_folder(shapes_dir, Bundle.load(trained_bundle_dir, "cpu"), index_dir, workers=0)
    app = create_app(Settings(bundle_dir=trained_bundle_dir, index_dir=index_dir, device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def operations(client: TestClient) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(method, path template, operation, form fields) for every operation the API documents."""
    schema = client.app.openapi()
    found = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            content = operation.get("requestBody", {}).get("content", {})
            body = next(iter(content.values()), {}).get("schema", {})
            if "$ref" in body:
                body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
            found.append((method, path, operation, body.get("properties", {})))
    return found


def image_bytes(size: tuple[int, int], format: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 40 + seed % 60).convert("RGB").save(buffer, format)
    return buffer.getvalue()


images = st.builds(
    image_bytes,
    st.tuples(st.integers(1, 96), st.integers(1, 96)),
    st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]),
    st.integers(0, 1000),
)
hostile_files = st.one_of(
    images,
    images.map(lambda data: data[: len(data) // 2]),  # truncated
    st.binary(max_size=256),
    st.just(b""),
    st.just(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
)
hostile_text = st.one_of(
    st.text(max_size=12),
    st.text(string.printable, max_size=40),
    st.sampled_from(["../../etc/passwd", "%00", "' OR 1=1 --", "NaN", "inf", "-0", "1e999"]),
)
hostile_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-5, 200),
    st.floats(allow_nan=True, allow_infinity=True),
)
values = st.one_of(hostile_numbers.map(str), hostile_text, st.booleans().map(str))


@st.composite
def requests(draw: st.DrawFn, client: TestClient) -> dict[str, Any]:
    """One request to one documented operation, its every part possibly wrong."""
    method, template, operation, fields = draw(st.sampled_from(operations(client)))
    path = template
    query: dict[str, str] = {}
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            value = quote(draw(values), safe="") or "0"
            path = path.replace(f"{{{parameter['name']}}}", value)
        elif parameter["in"] == "query" and draw(st.booleans()):
            query[parameter["name"]] = draw(values)
    files: list[tuple[str, tuple[str, bytes, str]]] = []
    data: dict[str, str] = {}
    for field, spec in fields.items():
        if not draw(st.integers(0, 9)):
            continue  # a missing field
        is_file = "binary" in str(spec) or spec.get("contentMediaType")
        for _ in range(draw(st.integers(1, 3)) if is_file else 1):
            if is_file:
                media = draw(st.sampled_from(["image/png", "application/octet-stream", "text/x"]))
                files.append((field, (draw(hostile_text) or "f", draw(hostile_files), media)))
            else:
                data[field] = draw(hostile_text)
    return {"method": method, "url": path, "params": query, "files": files or None, "data": data}


@pytest.mark.slow
def test_no_request_gets_a_5xx(client: TestClient) -> None:
    seen: list[int] = []

    @settings(
        max_examples=REQUESTS,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def one_request(data: st.DataObject) -> None:
        request = data.draw(requests(client))
        answer = client.request(**request)
        seen.append(answer.status_code)
        assert answer.status_code < 500, (request, answer.status_code, answer.text)
        if answer.status_code >= 400:
            assert isinstance(answer.json()["detail"], str), answer.text

    one_request()
    assert len(seen) >= REQUESTS
    assert {200, 201, 404, 413, 415, 422} & set(seen) >= {200, 422}  # both sides were reached
