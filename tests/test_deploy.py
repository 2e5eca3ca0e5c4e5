"""Deployment files: both Dockerfiles lint clean, the compose file is valid compose-spec with a
GPU profile, and the container's entry point (the app factory reading IMGSIM_* variables) serves
the page, read-only on its public address until a key is set."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.servers import answering, free_port
from tests.synthetic import noise_png

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """A console script of the test extra: beside this Python (the venv need not be active)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    assert path, f"{name} is installed by the project's test extra; reinstall with .[test]"
    return path


DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name: str) -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_fetches_weights_runs_unprivileged_and_checks_health(name: str) -> None:
    text = (ROOT / name).read_text()
    assert "build_model(sys.argv[1], 'imagenet')" in text
    assert "imgsim demo --no-serve --workdir /opt/demo" in text
    final = text[text.rindex("\nFROM ") :]  # the stage that ships: copies, no build tools
    assert "AS build" not in final and "pip install" not in final and "apt-get" not in final
    assert "COPY --from=build /opt/venv" in final
    # The weights' cache exists for every backbone (a Lite one downloads nothing) and is the
    # user's, who may download into it.
    assert "RUN mkdir -p /opt/torch && python -c" in text
    assert "&& rm -r /opt/venv/lib/python3.*/site-packages/torch/include" in text
    assert "COPY --from=build --chown=10001:10001 /opt/torch /opt/torch" in final
    assert "ARG TORCH_INDEX=" in text and '--index-url "${TORCH_INDEX}"' in text
    assert "IMGSIM_CACHE_DIR=/data/cache" in final
    assert "IMGSIM_BUNDLE_DIR=/opt/demo/bundle" in final and "IMGSIM_HOST=0.0.0.0" in final
    assert "\nUSER 10001" in final and "HEALTHCHECK" in final and "/health" in final
    assert '"app.main:create_app"' in final and "--factory" in final


def test_the_cuda_image_installs_cuda_wheels() -> None:
    text = (ROOT / "Dockerfile.cuda").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/${CUDA_WHEELS}" in text
    assert "ARG CUDA_WHEELS=cu" in text
    assert "NVIDIA_VISIBLE_DEVICES=all" in text


def test_compose_file_is_valid_compose_spec() -> None:
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    cpu, gpu = services["imgsim"], services["imgsim-gpu"]
    for service in (cpu, gpu):
        # The host's port is IMGSIM_PORT's (8000 unless set): CI runs it beside other services.
        assert service["ports"] == ["${IMGSIM_PORT:-8000}:8000"]
        assert "imgsim-data:/data" in service["volumes"]
        bundle = service["environment"]["IMGSIM_BUNDLE_DIR"]
        # Unset: the image's demo bundle; set empty: none (the ImageNet model), not the demo.
        assert bundle == "${IMGSIM_BUNDLE_DIR-/opt/demo/bundle}"
        assert "IMGSIM_API_KEY" in service["environment"]
    assert "profiles" not in cpu and cpu["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "Dockerfile.cuda"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_container_entry_point_serves_imagenet_without_a_bundle(
    cached_resnet18: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "IMGSIM_BACKBONE": "resnet18",
        "IMGSIM_BUNDLE_DIR": "",
        "IMGSIM_DEVICE": "cpu",
    }.items():
        monkeypatch.setenv(name, value)
    with TestClient(create_app()) as client:
        health = client.get("/health").json()
        assert health["classes"] == 1000 and health["index_size"] is None
        buffer = io.BytesIO()
        Image.new("RGB", (300, 200), (200, 30, 30)).save(buffer, "PNG")
        body = client.post("/classify", files={"file": ("red.png", buffer.getvalue())}).json()
        assert len(body["predictions"]) == 5 and body["predictions"][0]["label"] == body["label"]
        text = (ROOT / "tests" / "test_deploy.py").read_bytes()  # not an image
        assert client.post("/classify", files={"file": ("x.png", text)}).status_code == 422


def test_container_serves_the_page_read_only_until_a_key_is_set(
    untrained_bundle: Callable[[Path], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGSIM_BUNDLE_DIR", str(untrained_bundle(tmp_path / "bundle")))
    monkeypatch.setenv("IMGSIM_HOST", "0.0.0.0")  # as the Dockerfile sets it
    monkeypatch.setenv("IMGSIM_DEVICE", "cpu")
    image = {"files": ("a.png", noise_png(1))}
    with TestClient(create_app()) as client:
        page = client.get("/")
        assert page.status_code == 200 and "Search by image" in page.text
        assert client.get("/static/app.js").status_code == 200
        assert client.post("/images", files=image).status_code == 403
    monkeypatch.setenv("IMGSIM_API_KEY", "compose-key")
    with TestClient(create_app()) as client:
        assert client.post("/images", files=image).status_code == 401
        response = client.post("/images", files=image, headers={"x-api-key": "compose-key"})
        assert response.status_code == 201


@pytest.mark.slow
def test_the_containers_command_closes_connections_that_never_finish_their_headers(
    tmp_path: Path,
) -> None:
    """The Dockerfile's CMD (uvicorn's command line, the app factory) with its --http protocol:
    IMGSIM_HEADER_TIMEOUT holds there as under imgsim serve."""
    command = next(
        json.loads(line.removeprefix("CMD").strip().replace("\\\n", ""))
        for line in re.findall(r"^CMD \[.*?\]$", (ROOT / "Dockerfile").read_text(), re.S | re.M)
    )
    port = free_port()
    command = [
        *command[: command.index("--port") + 1],
        str(port),
        *command[command.index("--port") + 2 :],
    ]
    env = {
        **os.environ,
        "IMGSIM_BACKBONE": "efficientnet_lite0",
        "IMGSIM_DEVICE": "cpu",
        "IMGSIM_HOST": "127.0.0.1",
        "IMGSIM_HEADER_TIMEOUT": "1",
        "IMGSIM_CACHE_DIR": str(tmp_path / "cache"),
    }
    command[command.index("0.0.0.0")] = "127.0.0.1"
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / command[0]), *command[1:]],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        answering(process, f"http://127.0.0.1:{port}", "uvicorn", log)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            started = time.perf_counter()
            assert sock.recv(1024) == b""  # closed by the server
        assert 0.9 < time.perf_counter() - started < 3
    finally:
        process.terminate()
        process.wait(30)


def test_every_command_takes_imgsim_backbone_as_its_default() -> None:
    """The image sets IMGSIM_BACKBONE for serve; train and index inside it use it too."""
    env = {**os.environ, "IMGSIM_BACKBONE": "efficientnet_lite0"}
    for command in ("train", "index"):
        shown = subprocess.run(
            [sys.executable, "-m", "app.cli", command, "--help"],
            capture_output=True, text=True, env=env, check=True,
        ).stdout  # fmt: skip
        assert "(default: efficientnet_lite0)" in " ".join(shown.split()), command
