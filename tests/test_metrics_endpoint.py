"""GET /metrics: Prometheus text that parses and counts the requests just made, per route
template and status; each app has its own registry."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from app.stages import index_folder
from models.bundle import Bundle


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value of every sample in the exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**values: str) -> frozenset:
    return frozenset(values.items())


def test_metrics_count_the_requests_just_made(
    trained_bundle_dir: Path, shapes_dir: Path, tmp_path: Path
) -> None:
    bundle = Bundle.load(trained_bundle_dir, "cpu")
    index_folder(shapes_dir, bundle, tmp_path / "index", workers=0)
    settings = Settings(bundle_dir=trained_bundle_dir, index_dir=tmp_path / "index", device="cpu")
    image = (shapes_dir / "star" / "star_000.png").read_bytes()
    with TestClient(create_app(settings)) as client, TestClient(create_app(settings)) as other:
        for _ in range(3):
            assert client.post("/classify", files={"file": ("a.png", image)}).status_code == 200
        assert client.post("/classify", files={"file": ("a.png", b"no image")}).status_code == 422
        assert client.post("/similar?k=2", files={"file": ("a.png", image)}).status_code == 200
        assert client.get("/images/1").status_code == 200
        assert client.get("/nowhere").status_code == 404
        response = client.get("/metrics")
        assert other.get("/metrics").status_code == 200

    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    requests = "imgsim_requests_total"
    assert got[requests, labels(method="POST", endpoint="/classify", status="200")] == 3
    assert got[requests, labels(method="POST", endpoint="/classify", status="422")] == 1
    assert got[requests, labels(method="POST", endpoint="/similar", status="200")] == 1
    assert got[requests, labels(method="GET", endpoint="/images/{item_id}", status="200")] == 1
    assert got[requests, labels(method="GET", endpoint="unmatched", status="404")] == 1
    latency = "imgsim_request_duration_seconds_count"
    assert got[latency, labels(method="POST", endpoint="/classify", status="200")] == 3
    assert got["imgsim_inference_batch_size_sum", frozenset()] == 4  # 3 classify + 1 similar
    assert got["imgsim_model_forward_seconds_count", frozenset()] >= 1
    assert got["imgsim_index_size", frozenset()] == 40
    assert got["imgsim_inference_queue_depth", frozenset()] == 0
    assert got["imgsim_rejected_requests_total", frozenset()] == 0
    assert got["imgsim_unhandled_errors_total", frozenset()] == 0
    info = next(
        dict(name_labels) for (name, name_labels), _ in got.items() if name == "imgsim_model_info"
    )
    assert info["fingerprint"] == bundle.fingerprint == info["index_model"]
    assert info["classifier"] == bundle.fingerprint and info["added_classes"] == "0"
    assert info["backbone"] == "resnet18" and info["runtime"] == "openvino"  # auto, on the CPU
    assert info["index_type"] == "Flat" and info["index_version"] == "40"
    assert all(name.startswith("imgsim_") for name, _ in got)
