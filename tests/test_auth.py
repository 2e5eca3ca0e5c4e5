"""Writes need the API key; reads stay open; a public bind without a key is read-only."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app import stages
from app.auth import is_loopback
from app.main import create_app
from app.settings import Settings
from tests.synthetic import noise_png

KEY = "s3cret-key-for-tests"


@pytest.fixture
def settings(untrained_bundle: Callable[[Path], Path], tmp_path: Path) -> Callable[..., Settings]:
    """Settings over a private random-init resnet18 bundle; its collection starts at the first
    add. Each call gets its own bundle folder below tmp_path/name."""

    def make(name: str = "a", **values: object) -> Settings:
        return Settings(bundle_dir=untrained_bundle(tmp_path / name), device="cpu", **values)

    return make


@pytest.fixture
def keyed(settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(settings(api_key=KEY))) as client:
        yield client


def add(client: TestClient, seed: int, **headers: str):
    return client.post("/images", files={"files": ("a.png", noise_png(seed))}, headers=headers)


def test_writes_without_the_key_are_401_with_a_challenge(keyed: TestClient) -> None:
    for response in (
        add(keyed, 1),
        add(keyed, 1, authorization="Bearer wrong"),
        add(keyed, 1, **{"x-api-key": KEY[:-1]}),
        keyed.delete("/images/1"),
    ):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "X-API-Key" in response.json()["detail"]
    assert keyed.get("/images").json()["total"] == 0


def test_writes_with_the_key_succeed_and_reads_stay_open(keyed: TestClient) -> None:
    first = add(keyed, 1, authorization=f"Bearer {KEY}")
    second = add(keyed, 2, **{"x-api-key": KEY})
    assert first.status_code == second.status_code == 201, first.text
    item_id = first.json()["images"][0]["id"]
    assert keyed.get(f"/images/{item_id}").status_code == 200
    assert keyed.get(f"/images/{item_id}/file").status_code == 200
    assert keyed.get("/health").json()["writes"] == "key"
    assert keyed.delete(f"/images/{item_id}", headers={"x-api-key": KEY}).status_code == 204
    assert keyed.get("/images").json()["total"] == 1


def test_a_public_bind_without_a_key_is_read_only(settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings(host="0.0.0.0"))) as client:
        response = add(client, 1)
        assert response.status_code == 403
        assert "IMGSIM_API_KEY" in response.json()["detail"]
        assert "--allow-open-writes" in response.json()["detail"]
        assert client.delete("/images/1").status_code == 403
        assert client.get("/health").json()["writes"] == "read-only"
        assert client.get("/images").status_code == 200


def test_open_writes_on_loopback_or_when_allowed(settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings("a"))) as client:
        assert add(client, 1).status_code == 201
    allowed = settings("b", host="0.0.0.0", allow_open_writes=True)
    with TestClient(create_app(allowed)) as client:
        assert add(client, 1).status_code == 201
        assert client.get("/health").json()["writes"] == "open"


def test_serve_passes_its_host_on_and_says_so_once(
    settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    served = {}
    monkeypatch.setattr(stages.uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    stages.serve(settings(), host="0.0.0.0", port=8123)
    assert served["host"] == "0.0.0.0"
    with caplog.at_level(logging.INFO), TestClient(served["app"]) as client:
        assert add(client, 1).status_code == 403
    lines = [r.getMessage() for r in caplog.records if "read-only" in r.getMessage()]
    assert len(lines) == 1 and "IMGSIM_API_KEY" in lines[0]


def test_the_key_is_never_logged_or_shown(
    settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    configured = settings(api_key=KEY, host="0.0.0.0")
    assert KEY not in repr(configured) and KEY not in str(configured.model_dump())
    with caplog.at_level(logging.DEBUG), TestClient(create_app(configured)) as client:
        add(client, 1, authorization="Bearer nope")
        add(client, 2, authorization=f"Bearer {KEY}")
        page = client.get("/").text
    assert KEY not in caplog.text and KEY not in page


def test_cors_is_off_unless_origins_are_set(
    settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    preflight = {"origin": "https://a.example", "access-control-request-method": "POST"}
    with TestClient(create_app(settings("a"))) as client:
        response = client.options("/classify", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    monkeypatch.setenv("IMGSIM_CORS_ORIGINS", "https://a.example, https://b.example")
    configured = settings("b")
    assert configured.cors_origins == ["https://a.example", "https://b.example"]
    with TestClient(create_app(configured)) as client:
        response = client.options("/classify", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://a.example"
        other = client.options("/classify", headers={**preflight, "origin": "https://c.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
