"""Serving under load, in-process: concurrent requests share one forward and each gets its own
answer; a full queue answers 503 + Retry-After at once; /health and /ready answer while the model
is busy; /ready is 503 without an index.

No clock decides anything: the first forward is held on an event until the other requests are
queued (the queue depth says so), then released.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.batching import Batcher
from app.errors import NotReady
from app.main import create_app
from app.service import Service, load_service
from app.settings import Settings, available_cpus
from app.stages import index_folder
from models.bundle import Bundle, Encoded

WAIT = 60.0  # seconds before a stuck test fails instead of hanging
SHAPES = [("star", 0), ("circle", 1), ("square", 2), ("triangle", 3), ("star", 4)]


class HeldForward:
    """Wraps Bundle.forward: records each batch's size; the first call waits for `release`."""

    def __init__(self, forward: Callable[[torch.Tensor], Encoded]):
        self.forward = forward
        self.sizes: list[int] = []
        self.release = threading.Event()

    def __call__(self, pixels: torch.Tensor) -> Encoded:
        self.sizes.append(len(pixels))
        if len(self.sizes) == 1 and not self.release.wait(WAIT):
            raise TimeoutError("the test never released the first forward")
        return self.forward(pixels)


@pytest.fixture(scope="module")
def index_dir(trained_bundle_dir: Path, shapes_dir: Path, tmp_path_factory: Any) -> Path:
    out = tmp_path_factory.mktemp("serving") / "index"
    index_folder(shapes_dir, Bundle.load(trained_bundle_dir, "cpu"), out, workers=0)
    return out


def serving(bundle_dir: Path, index_dir: Path | None, **limits: Any) -> tuple[FastAPI, Service]:
    settings = Settings(bundle_dir=bundle_dir, index_dir=index_dir, device="cpu", **limits)
    service = load_service(settings)
    return create_app(settings, service), service


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WAIT} s for {what}")
        time.sleep(0.01)


def post(client: TestClient, path: str, data: bytes) -> httpx.Response:
    return client.post(path, files={"file": ("x.png", data, "image/png")})


def in_threads(calls: list[Callable[[], httpx.Response]]) -> tuple[list, list[threading.Thread]]:
    answers: list = [None] * len(calls)

    def run(i: int) -> None:
        answers[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    return answers, threads


@pytest.fixture
def held(
    trained_bundle_dir: Path, index_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TestClient, HeldForward, Service]]:
    app, service = serving(trained_bundle_dir, index_dir, max_batch=8, queue_size=4)
    hold = HeldForward(service.bundle.forward)
    with TestClient(app) as client:
        monkeypatch.setattr(service.bundle, "forward", hold)
        yield client, hold, service
        hold.release.set()


def test_concurrent_requests_share_a_forward_and_each_gets_its_own_answer(
    held: tuple[TestClient, HeldForward, Service], shapes_dir: Path
) -> None:
    client, hold, service = held
    batcher = client.app.state.batcher  # type: ignore[attr-defined]
    files = [(shapes_dir / n / f"{n}_{i:03d}.png").read_bytes() for n, i in SHAPES]
    reference = Bundle.load(service.settings.bundle_dir, "cpu")  # the offline encode path
    alone = [reference.encode(data, batch_size=1).probabilities()[0] for data in files]

    first, first_threads = in_threads([lambda: post(client, "/classify?top_k=4", files[0])])
    until(lambda: hold.sizes == [1], "the first forward to start")
    calls = [lambda d=d: post(client, "/classify?top_k=4", d) for d in files[1:]]
    rest, threads = in_threads(calls)
    until(lambda: batcher.depth == len(calls), "the other requests to queue")
    hold.release.set()
    for thread in first_threads + threads:
        thread.join(WAIT)

    assert hold.sizes == [1, len(calls)]
    for response, probabilities in zip(first + rest, alone, strict=True):
        assert response.status_code == 200
        got = {p["label"]: p["score"] for p in response.json()["predictions"]}
        classes = service.bundle.config.classes
        expected = {classes[i]: float(p) for i, p in enumerate(probabilities)}
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, abs=1e-4)
    body = client.get("/metrics").text
    assert "imgsim_inference_batch_size_count 2.0" in body
    assert f"imgsim_inference_batch_size_sum {float(1 + len(calls))}" in body


def test_batched_similar_answers_as_unbatched(
    trained_bundle_dir: Path, index_dir: Path, shapes_dir: Path
) -> None:
    files = [(shapes_dir / n / f"{n}_{i:03d}.png").read_bytes() for n, i in SHAPES]
    app, _ = serving(trained_bundle_dir, index_dir, max_batch=1)
    with TestClient(app) as client:
        one_by_one = [post(client, "/similar?k=3", d).json()["neighbours"] for d in files]
    app, _ = serving(trained_bundle_dir, index_dir, max_batch=8, max_wait_ms=200)
    with TestClient(app) as client:
        together, threads = in_threads([lambda d=d: post(client, "/similar?k=3", d) for d in files])
        for thread in threads:
            thread.join(WAIT)
        sizes = client.app.state.metrics.batch_size.collect()[0].samples  # type: ignore[attr-defined]
    forwards = next(s.value for s in sizes if s.name.endswith("_count"))
    assert forwards < len(files)  # some requests shared a forward
    for response, alone in zip(together, one_by_one, strict=True):
        neighbours = response.json()["neighbours"]
        assert [n["id"] for n in neighbours] == [n["id"] for n in alone]
        assert [n["score"] for n in neighbours] == pytest.approx([n["score"] for n in alone])


def test_a_full_queue_answers_503_with_retry_after_and_health_stays_fast(
    held: tuple[TestClient, HeldForward, Service], shapes_dir: Path
) -> None:
    client, hold, _ = held
    batcher = client.app.state.batcher  # type: ignore[attr-defined]
    data = (shapes_dir / "star" / "star_000.png").read_bytes()
    first, first_threads = in_threads([lambda: post(client, "/classify", data)])
    until(lambda: hold.sizes == [1], "the first forward to start")
    queued, threads = in_threads([lambda: post(client, "/classify", data) for _ in range(4)])
    until(lambda: batcher.depth == 4, "the queue to fill")

    started = time.perf_counter()
    refused = post(client, "/classify", data)
    health = client.get("/health")
    ready = client.get("/ready")
    elapsed = time.perf_counter() - started
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "busy" in refused.json()["detail"]
    assert health.status_code == 200 and ready.status_code == 200
    assert ready.json()["queue_depth"] == 4
    assert elapsed < 5  # answered while the forward is held, not after it

    hold.release.set()
    for thread in first_threads + threads:
        thread.join(WAIT)
    assert [r.status_code for r in first + queued] == [200] * 5
    assert "imgsim_rejected_requests_total 1.0" in client.get("/metrics").text


def test_uploads_waiting_to_be_decoded_count_in_the_queue(
    trained_bundle_dir: Path, index_dir: Path, shapes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one decoding thread held, the request it decodes and the one waiting for it fill a
    queue of 2: the third is refused at once instead of waiting behind them."""
    app, service = serving(trained_bundle_dir, index_dir, queue_size=2, threads=1)
    decode, release = service.bundle.decode, threading.Event()

    def held_decode(*args: Any, **kwargs: Any) -> Any:
        if not release.wait(WAIT):
            raise TimeoutError("the test never released the decoding")
        return decode(*args, **kwargs)

    data = (shapes_dir / "star" / "star_000.png").read_bytes()
    with TestClient(app) as client:
        monkeypatch.setattr(service.bundle, "decode", held_decode)
        batcher = client.app.state.batcher  # type: ignore[attr-defined]
        admitted, threads = in_threads([lambda: post(client, "/classify", data)] * 2)
        until(lambda: batcher.depth == 2, "both uploads to be admitted")
        refused = post(client, "/classify", data)
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        release.set()
        for thread in threads:
            thread.join(WAIT)
        assert [r.status_code for r in admitted] == [200, 200]
        assert batcher.depth == 0


def test_ready_is_503_without_an_index(trained_bundle_dir: Path) -> None:
    settings = Settings(device="cpu")  # no bundle folder, no index folder: nowhere to search
    service = Service(settings, Bundle.load(trained_bundle_dir, "cpu"), None)
    with TestClient(create_app(settings, service)) as client:
        response = client.get("/ready")
        assert response.status_code == 503
        assert "no index" in response.json()["detail"]
        assert client.get("/health").status_code == 200


def test_threads_default_to_the_cores_this_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMGSIM_THREADS", raising=False)
    assert 1 <= Settings().threads == available_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("IMGSIM_THREADS", "1")
    assert Settings().threads == 1


def test_uvicorn_serves_with_its_c_http_parser_and_event_loop() -> None:
    """`imgsim serve` leaves uvicorn's HTTP parser and event loop on "auto", which is httptools
    and uvloop only when they are installed; h11 and asyncio cost more CPU per request."""
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn.Config(FastAPI())
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol
    assert config.get_loop_factory() is uvloop.new_event_loop


def test_a_failed_forward_is_a_500_and_the_worker_serves_the_next_request(
    trained_bundle_dir: Path, index_dir: Path, shapes_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, service = serving(trained_bundle_dir, index_dir)
    forward, calls = service.bundle.forward, []

    def fails_once(pixels: torch.Tensor) -> Encoded:
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("the runtime failed")
        return forward(pixels)

    data = (shapes_dir / "star" / "star_000.png").read_bytes()
    with TestClient(app, raise_server_exceptions=False) as client:
        monkeypatch.setattr(service.bundle, "forward", fails_once)
        failed = post(client, "/classify", data)
        assert failed.status_code == 500 and failed.json()["request_id"]
        answered = post(client, "/classify", data)
        assert answered.status_code == 200 and answered.json()["predictions"]
        assert client.app.state.batcher.depth == 0  # type: ignore[attr-defined]
    assert calls == [1, 1]


def test_stopping_answers_the_requests_the_worker_has_taken() -> None:
    """A request the worker has taken, and is holding while it waits for more (max_wait_ms),
    is still run and answered when the service stops, not left waiting for ever."""

    def forward(pixels: torch.Tensor) -> Encoded:
        rows = np.ones((len(pixels), 2), np.float32)
        return Encoded(rows, rows)

    async def scenario() -> Encoded:
        batcher = Batcher(forward, max_batch=4, max_wait_ms=WAIT * 1000, queue_size=4)
        batcher.start()
        request = asyncio.create_task(batcher.encode([torch.zeros(3, 8, 8)]))
        await asyncio.sleep(0)  # the request is queued
        while batcher.depth:  # taken into a batch: the worker now waits for more
            await asyncio.sleep(0.01)
        await batcher.stop()
        return await asyncio.wait_for(request, WAIT)

    assert asyncio.run(scenario()).embeddings.shape == (1, 2)


def test_an_upload_that_cannot_be_decoded_is_refused_and_gives_back_its_place(
    trained_bundle_dir: Path, index_dir: Path, shapes_dir: Path
) -> None:
    app, _ = serving(trained_bundle_dir, index_dir, queue_size=1)
    data = (shapes_dir / "star" / "star_000.png").read_bytes()
    with TestClient(app) as client:
        batcher = client.app.state.batcher  # type: ignore[attr-defined]
        for path in ("/classify", "/similar"):
            refused = post(client, path, b"not an image at all")
            assert refused.status_code == 422 and "not an image" in refused.text
            assert batcher.depth == 0
            assert post(client, path, data).status_code == 200


def test_an_upload_still_being_decoded_when_the_service_stops_is_refused() -> None:
    """Its decoding thread finishes after the stop: the request gets NotReady (503), it is
    neither run nor left waiting."""
    started, release = threading.Event(), threading.Event()

    def prepare() -> list[torch.Tensor]:
        started.set()
        release.wait(WAIT)
        return [torch.zeros(3, 8, 8)]

    def forward(pixels: torch.Tensor) -> Encoded:
        raise AssertionError("nothing should reach the model")

    async def scenario() -> None:
        batcher = Batcher(forward, max_batch=4, max_wait_ms=1, queue_size=4)
        batcher.start()
        request = asyncio.create_task(batcher.encode_prepared(prepare))
        while not started.is_set():
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(batcher.stop())
        await asyncio.sleep(0)  # the stop has begun: the worker takes nothing more
        release.set()
        await asyncio.wait_for(stopping, WAIT)
        with pytest.raises(NotReady):
            await asyncio.wait_for(request, WAIT)
        assert batcher.depth == 0

    asyncio.run(scenario())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads Linux's /proc")
def test_the_worker_and_decoding_threads_are_named_in_the_os() -> None:
    """`top -H` and /proc/PID/task/*/comm tell an operator which thread is busy: the inference
    worker and the decoding threads, not one "python" each."""

    def forward(pixels: torch.Tensor) -> Encoded:
        rows = np.ones((len(pixels), 2), np.float32)
        return Encoded(rows, rows)

    def os_names() -> set[str]:
        return {(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()}

    async def scenario() -> set[str]:
        batcher = Batcher(forward, max_batch=4, max_wait_ms=1, queue_size=4)
        batcher.start()
        try:
            await batcher.encode_prepared(lambda: [torch.zeros(3, 8, 8)])
            return os_names()
        finally:
            await batcher.stop()

    assert {"imgsim-inferenc", "imgsim-decoding"} <= asyncio.run(scenario())
