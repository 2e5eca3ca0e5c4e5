"""Requests that would cost the server more than they should: limits that hold before the body
is read, against a real `imgsim serve`; and errors that stay JSON, in-process."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from index.gallery import GalleryIndex
from index.sqlite_store import ItemStore
from models.bundle import Bundle
from tests.servers import free_port, start_server
from tests.synthetic import noise_png

LIMIT = 1_000_000
# The drip test sends a byte every 0.25 s: 1.75 s of slack under the stall timeout on a busy CI
# machine (a 0.5 s drip against 1 s stalled there once).
BODY_TIMEOUT, BODY_DEADLINE, HEADER_TIMEOUT = 2, 5, 2
SMALL_LIMITS = {
    "IMGSIM_MAX_REQUEST_BYTES": str(LIMIT),
    "IMGSIM_BODY_TIMEOUT": str(BODY_TIMEOUT),
    "IMGSIM_BODY_DEADLINE": str(BODY_DEADLINE),
    "IMGSIM_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
}


def empty_index(bundle_dir: Path, parent: Path) -> Path:
    bundle = Bundle.load(bundle_dir, "cpu")
    GalleryIndex.create(bundle.embedding_dim, bundle.fingerprint, parent / "index").close()
    return parent / "index"


@pytest.fixture(scope="module")
def server(trained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real server with a 1 MB body limit, a 2 s body timeout, a 5 s body deadline and a 2 s
    header timeout; yields its port."""
    port = free_port()
    index_dir = empty_index(trained_bundle_dir, tmp_path_factory.mktemp("limits"))
    process = start_server(trained_bundle_dir, index_dir, port, SMALL_LIMITS)
    yield port
    process.terminate()
    process.wait(30)


def request_head(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of one HTTP/1.1 answer with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


MULTIPART = "multipart/form-data; boundary=xyz"
PART_HEAD = (
    b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n"
)


def chunked(data: bytes) -> bytes:
    """One chunk of a chunked transfer encoding."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.slow
def test_declared_oversize_body_is_refused_before_it_is_read(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        headers = {"Content-Type": MULTIPART, "Content-Length": str(200 * 1024 * 1024)}
        started = time.perf_counter()
        sock.sendall(request_head("/classify", headers) + b"x" * 65536)  # 64 KiB of 200 MiB
        status, body = read_answer(sock)
        elapsed = time.perf_counter() - started
    assert status == 413 and f"{LIMIT:,} bytes" in body["detail"]
    assert elapsed < 0.2


@pytest.mark.slow
def test_chunked_body_is_cut_off_at_the_limit(server: int) -> None:
    chunk = b"x" * 65536
    framed = chunked(chunk)
    sent = 0
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        headers = {"Content-Type": MULTIPART, "Transfer-Encoding": "chunked"}
        sock.sendall(request_head("/classify", headers) + chunked(PART_HEAD))
        sock.setblocking(False)
        answer = b""
        while not answer and sent < 20 * LIMIT:
            try:
                sock.sendall(framed)
                sent += len(chunk)
            except BlockingIOError:
                time.sleep(0.01)
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                pass
        sock.setblocking(True)
        status = int(answer.split()[1])
    assert status == 413  # how much it read is counted exactly below, at the ASGI level


def test_a_streamed_body_is_read_no_further_than_the_limit(client: TestClient) -> None:
    app, pulled, answers = client.app, [0], []
    chunk = b"x" * 65536

    async def receive() -> dict:
        pulled[0] += 1
        body = PART_HEAD if pulled[0] == 1 else chunk
        return {"type": "http.request", "body": body, "more_body": True}  # never ends

    async def send(message: dict) -> None:
        answers.append(message)

    headers = [(b"content-type", MULTIPART.encode()), (b"transfer-encoding", b"chunked")]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "headers": headers,
        "query_string": b"",
        "http_version": "1.1",
        "scheme": "http",
        "root_path": "",
        "server": ("test", 80),
        "client": ("test", 1),
        "app": app,
    }
    asyncio.run(app(scope, receive, send))
    assert answers[0]["status"] == 413
    body_chunks = pulled[0] - 1  # after the part's head
    assert (body_chunks - 1) * len(chunk) <= LIMIT < body_chunks * len(chunk)


@pytest.mark.slow
def test_stalled_body_times_out(server: int) -> None:
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        headers = {"Content-Type": MULTIPART, "Content-Length": "5000"}
        sock.sendall(request_head("/classify", headers) + PART_HEAD)
        started = time.perf_counter()
        status, body = read_answer(sock)
    assert status == 408 and "stalled" in body["detail"]
    assert time.perf_counter() - started < BODY_TIMEOUT + 3


@pytest.mark.slow
def test_a_body_that_drips_is_cut_off_at_the_deadline(server: int) -> None:
    """A byte every 0.25 s never stalls for the 2 s timeout; the whole-body deadline ends it."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        headers = {"Content-Type": MULTIPART, "Content-Length": "5000"}
        sock.sendall(request_head("/classify", headers) + PART_HEAD)
        started = time.perf_counter()
        sock.setblocking(False)
        answer = b""
        while not answer and time.perf_counter() - started < 3 * BODY_DEADLINE:
            sock.sendall(b"x")
            time.sleep(0.25)
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                pass
        elapsed = time.perf_counter() - started
    said = f"took longer than {BODY_DEADLINE} s".encode()
    assert answer.startswith(b"HTTP/1.1 408") and said in answer
    assert BODY_DEADLINE <= elapsed < BODY_DEADLINE + 1.5


@pytest.mark.slow
def test_connections_that_never_finish_their_headers_are_closed(server: int) -> None:
    """40 clients sending a header line a second: each is closed at the header timeout, and
    /health answers in milliseconds meanwhile."""
    socks = [socket.create_connection(("127.0.0.1", server), timeout=10) for _ in range(40)]
    started = time.perf_counter()
    for sock in socks:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    health = []
    closed: dict[int, float] = {}
    while len(closed) < len(socks) and time.perf_counter() - started < 4 * HEADER_TIMEOUT:
        for i, sock in enumerate(socks):
            if i in closed:
                continue
            try:
                sock.sendall(b"X-Drip: 1\r\n")
            except OSError:  # reset or closed by the server
                closed[i] = time.perf_counter() - started
        asked = time.perf_counter()
        assert httpx.get(f"http://127.0.0.1:{server}/health", timeout=5).status_code == 200
        health.append(time.perf_counter() - asked)
        time.sleep(1)
    for sock in socks:
        sock.close()
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} connections still open"
    assert max(closed.values()) < HEADER_TIMEOUT + 2.5 and max(health) < 0.5


@pytest.fixture(scope="module")
def client(trained_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    index_dir = empty_index(trained_bundle_dir, tmp_path_factory.mktemp("errors"))
    settings = Settings(
        bundle_dir=trained_bundle_dir,
        index_dir=index_dir,
        device="cpu",
        max_files=3,
        max_request_bytes=LIMIT,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_too_many_files_is_a_clear_400(client: TestClient) -> None:
    files = [("files", (f"{i}.png", noise_png(i, 16), "image/png")) for i in range(4)]
    answer = client.post("/images", files=files)
    assert answer.status_code == 400 and "Maximum number of files is 3" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("get", "/images/{}"), ("delete", "/images/{}"), ("get", "/images/{}/similar")],
)
def test_ids_out_of_range_are_422_not_500(client: TestClient, method: str, path: str) -> None:
    for item_id in (2**63, 2**64 + 5, -1):
        answer = client.request(method, path.format(item_id))
        assert answer.status_code == 422, answer.text
        assert "item_id" in answer.json()["detail"]
    assert client.request(method, path.format(2**63 - 1)).status_code == 404


def test_full_disk_is_507_and_stores_nothing(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    files = [("files", ("a.png", noise_png(1, 32), "image/png"))]
    assert client.post("/images", files=files).status_code == 201
    size = client.get("/health").json()["index_size"]
    monkeypatch.setattr(GalleryIndex, "add", disk_full)
    answer = client.post("/images", files=[("files", ("b.png", noise_png(2, 32), "image/png"))])
    assert answer.status_code == 507 and "disk is full" in answer.json()["detail"]
    monkeypatch.undo()
    assert client.get("/health").json()["index_size"] == size


def test_a_delete_on_a_full_disk_is_507_and_keeps_the_image(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's SQLITE_FULL on the delete's commit (tests/test_full_disk.py has the real disk)."""
    added = client.post("/images", files=[("files", ("c.png", noise_png(3, 32), "image/png"))])
    item_id = added.json()["images"][0]["id"]

    def disk_full(*args: object, **kwargs: object) -> None:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise error

    monkeypatch.setattr(ItemStore, "delete", disk_full)
    answer = client.delete(f"/images/{item_id}")
    assert answer.status_code == 507 and "disk is full" in answer.json()["detail"]
    monkeypatch.undo()
    assert client.get(f"/images/{item_id}").status_code == 200


def test_an_unexpected_error_is_a_json_500_with_a_request_id(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom at /secret/server/path")

    monkeypatch.setattr(GalleryIndex, "search", broken)
    answer = client.post("/similar", files={"file": ("a.png", noise_png(3, 32), "image/png")})
    body = answer.json()
    assert answer.status_code == 500
    assert body["request_id"] == answer.headers["X-Request-ID"]
    assert body["request_id"] in body["detail"] and "/secret" not in answer.text
    metrics = client.get("/metrics").text
    assert "imgsim_unhandled_errors_total 1.0" in metrics
    assert 'endpoint="/similar",method="POST",status="500"' in metrics


def test_every_answer_carries_the_request_id(client: TestClient) -> None:
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == (
        "abc-123"
    )
    generated = client.get("/nowhere").headers["X-Request-ID"]
    assert len(generated) == 32 and generated != client.get("/nowhere").headers["X-Request-ID"]
