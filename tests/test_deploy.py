"""Deployment files: the Dockerfile lints clean, the compose file is valid compose-spec, and the
container's entry point (the app factory reading IMGSIM_* variables) serves with no bundle."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """A console script of the test extra: beside this Python (the venv need not be active)."""
    beside = Path(sys.executable).parent / name
    path = str(beside) if beside.exists() else shutil.which(name)
    assert path, f"{name} is installed by the project's test extra; reinstall with .[test]"
    return path


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_fetches_weights_runs_unprivileged_and_checks_health() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "build_model(sys.argv[1], 'imagenet')" in text
    assert "\nUSER 10001" in text and "HEALTHCHECK" in text and "/health" in text
    assert '"app.main:create_app"' in text and "--factory" in text


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
    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["imgsim"]
    assert "8000:8000" in service["ports"]
    assert "imgsim-data:/data" in service["volumes"]


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
