"""The image built and run with `docker compose`, step by step as the README's Docker section:
build, up and healthy, the page and the API on the demo bundle, writes with and without the
key, then a bundle trained and indexed inside the container, served. Prints the build time, the
start time (up -d until healthy) and the image's size; tears everything down.

It needs a running Docker Engine and builds for minutes, so it runs only under
IMGSIM_DOCKER_TEST=1, which .ci/docker sets once the engine answers (TORCH_INDEX and
PIP_TRUSTED_HOST, when set, are passed to the build). The backbone is efficientnet_lite0, whose
weights come with pip.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.samples import SHAPES, draw_shape
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "efficientnet_lite0"
KEY = "docker-test-key"
IMAGE = "imgsim:latest"  # docker-compose.yml's image of the CPU service
HEALTHY_WITHIN = 300  # seconds; the health check's start period is 120

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("IMGSIM_DOCKER_TEST") != "1",
        reason="builds and runs the Docker image: run .ci/docker (it sets IMGSIM_DOCKER_TEST=1)",
    ),
]


class Compose:
    """`docker compose` on a project of its own, published on a free port of this machine."""

    def __init__(self, project: str, port: int) -> None:
        # The caller's IMGSIM_* variables would change what compose starts: only ours count.
        clean = {k: v for k, v in os.environ.items() if not k.startswith("IMGSIM_")}
        self.env = {
            **clean,
            "COMPOSE_PROJECT_NAME": project,
            "IMGSIM_PORT": str(port),
            "IMGSIM_BACKBONE": BACKBONE,
        }
        self.base = f"http://127.0.0.1:{port}"
        self.times: dict[str, float] = {}

    def __call__(self, *args: str, env: dict[str, str] | None = None, timeout: int = 600) -> str:
        """Run `docker compose ARGS` in the project folder; its stdout, or fail with its output."""
        result = subprocess.run(
            ["docker", "compose", *args],
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"docker compose {' '.join(args)} failed:\n{output[-5000:]}"
        return result.stdout

    def health(self) -> str:
        """The service container's health status as Docker reports it."""
        container = self("ps", "-q", "imgsim").strip()
        return subprocess.run(
            ["docker", "inspect", "-f", "{{.State.Health.Status}}", container],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    def up(self, **env: str) -> float:
        """`up -d` with these IMGSIM_* variables; the seconds until Docker reports healthy."""
        start = time.monotonic()
        self("up", "-d", env=env)
        while time.monotonic() - start < HEALTHY_WITHIN:
            if self.health() == "healthy":
                return time.monotonic() - start
            time.sleep(1)
        logs = self("logs", "--tail", "50", "imgsim")
        raise AssertionError(f"not healthy within {HEALTHY_WITHIN} s; its log:\n{logs}")


def shape_png(shape: str, seed: int = 1) -> bytes:
    """One of the demo's generated shapes, as PNG bytes."""
    buffer = io.BytesIO()
    draw_shape(shape, 128, random.Random(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_size(image: str) -> int:
    """The image's size in bytes, as `docker image ls` counts it."""
    command = ["docker", "image", "inspect", "-f", "{{.Size}}", image]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    """The image built, and the service up and healthy on the demo bundle; torn down after."""
    compose = Compose(f"imgsim-test-{os.getpid()}", free_port())
    build = ["build"]
    for arg in ("TORCH_INDEX", "PIP_TRUSTED_HOST"):  # a mirror of the torch wheels
        if os.environ.get(arg):
            build += ["--build-arg", f"{arg}={os.environ[arg]}"]
    start = time.monotonic()
    compose(*build, timeout=1800)
    compose.times["build"] = time.monotonic() - start
    try:
        compose.times["start"] = compose.up()
        yield compose
    finally:
        compose("down", "--volumes", "--timeout", "10")
        size = image_size(IMAGE)
        if os.environ.get("IMGSIM_DOCKER_KEEP_IMAGE") != "1":
            subprocess.run(["docker", "image", "rm", IMAGE], capture_output=True, check=True)
        times = compose.times
        print(
            f"\ndocker: build {times['build']:.0f} s, start (up -d to healthy) "
            f"{times.get('start', float('nan')):.0f} s, image {IMAGE} {size / 1e9:.2f} GB"
        )


def test_the_service_becomes_healthy_and_runs_as_uid_10001(compose: Compose) -> None:
    assert compose.health() == "healthy"
    assert compose("exec", "-T", "imgsim", "id", "-u").strip() == "10001"


def test_the_page_health_ready_and_metrics_answer(compose: Compose) -> None:
    page = httpx.get(compose.base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(compose.base + "/health").json()["status"] == "ok"
    assert httpx.get(compose.base + "/ready").status_code == 200
    assert "imgsim" in httpx.get(compose.base + "/metrics").text


def test_the_demo_bundle_classifies_and_finds_similar_shapes(compose: Compose) -> None:
    upload = {"file": ("circle.png", shape_png("circle"), "image/png")}
    classify = httpx.post(compose.base + "/classify", files=upload, timeout=60)
    assert classify.status_code == 200, classify.text
    assert {p["label"] for p in classify.json()["predictions"]} <= set(SHAPES)
    similar = httpx.post(compose.base + "/similar", files=upload, params={"k": 3}, timeout=60)
    assert similar.status_code == 200, similar.text
    neighbours = similar.json()["neighbours"]
    assert len(neighbours) == 3 and {n["label"] for n in neighbours} <= set(SHAPES)


def test_writes_are_refused_without_the_key_and_taken_with_it(compose: Compose) -> None:
    upload = {"files": ("square.png", shape_png("square"), "image/png")}
    assert httpx.post(compose.base + "/images", files=upload).status_code == 403
    compose.up(IMGSIM_API_KEY=KEY)
    wrong = httpx.post(compose.base + "/images", files=upload, headers={"X-API-Key": "wrong"})
    assert wrong.status_code == 401
    added = httpx.post(compose.base + "/images", files=upload, headers={"X-API-Key": KEY})
    assert added.status_code == 201, added.text
    item = added.json()["images"][0]["id"]
    deleted = httpx.delete(f"{compose.base}/images/{item}", headers={"X-API-Key": KEY})
    assert deleted.status_code == 204


def test_a_bundle_trained_and_indexed_in_the_container_is_served(compose: Compose) -> None:
    # The user's photos, two classes the demo does not have, in a folder the container's user
    # (uid 10001) can read.
    classes = {"ring": "circle", "block": "square"}
    photos = Path(tempfile.mkdtemp(prefix="imgsim-photos-"))
    try:
        photos.chmod(0o755)
        rng = random.Random(0)
        for label, shape in classes.items():
            (photos / label).mkdir(mode=0o755)
            for i in range(12):
                draw_shape(shape, 128, rng).save(photos / label / f"{i:02d}.png")
        copy = ["cp", "-r", "/in", "/data/images"]
        compose("run", "--rm", "-v", f"{photos}:/in:ro", "imgsim", *copy)
    finally:
        shutil.rmtree(photos)
    run = ["run", "--rm", "imgsim", "imgsim"]
    fast = ["--epochs", "1", "--no-probe", "--workers", "0", "--device", "cpu"]
    compose(*run, "train", "/data/images", "--out", "/data/bundle", *fast)
    compose(*run, "index", "/data/images", "--model", "/data/bundle")
    compose.up(IMGSIM_BUNDLE_DIR="/data/bundle", IMGSIM_API_KEY=KEY)

    upload = {"file": ("ring.png", shape_png("circle", seed=7), "image/png")}
    classify = httpx.post(compose.base + "/classify", files=upload, timeout=60)
    assert classify.status_code == 200, classify.text
    assert {p["label"] for p in classify.json()["predictions"]} == set(classes)
    similar = httpx.post(compose.base + "/similar", files=upload, params={"k": 5}, timeout=60)
    assert {n["label"] for n in similar.json()["neighbours"]} <= set(classes)
