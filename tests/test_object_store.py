"""Uploaded images kept in an object store (s3://bucket/prefix, through fsspec), which every
replica reaches: here a real S3 API on loopback (moto's server) behind s3fs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port, start_server
from tests.synthetic import noise_png

pytestmark = pytest.mark.slow
s3fs = pytest.importorskip("s3fs", reason="pip install 'imgsim[s3]' for the object-store tests")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An empty bucket on an S3 server of its own; the environment that reaches it."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "imgsim",
        "AWS_SECRET_ACCESS_KEY": "imgsim",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem(anon=False).mkdir("images-bucket")
    try:
        yield env
    finally:
        server.stop()


def test_an_image_uploaded_to_one_replica_is_served_by_another_from_s3(
    bucket: dict[str, str],
    untrained_bundle: Callable[[Path], Path],
    tmp_path: Path,
    postgres_url: str,
) -> None:
    env = {
        **bucket,
        "IMGSIM_DATABASE_URL": postgres_url,
        "IMGSIM_UPLOADS_URL": "s3://images-bucket/shared",
    }
    bundle = untrained_bundle(tmp_path / "bundle")
    ports = [free_port(), free_port()]
    # Each replica has a folder of its own for snapshots: the images are only in the bucket.
    servers = [start_server(bundle, tmp_path / f"index-{p}", p, env) for p in ports]
    first, second = (f"http://127.0.0.1:{p}" for p in ports)
    try:
        image = noise_png(9, 40)
        answer = httpx.post(f"{first}/images", files={"files": ("a.png", image, "image/png")})
        assert answer.status_code == 201, answer.text
        [added] = answer.json()["images"]
        digest = hashlib.sha256(image).hexdigest()
        assert s3fs.S3FileSystem().cat(f"images-bucket/shared/{digest}.png") == image
        served = httpx.get(f"{second}/images/{added['id']}/file")
        assert served.status_code == 200 and served.content == image
        assert served.headers["content-type"] == "image/png"
        thumbnail = httpx.get(f"{second}/images/{added['id']}/thumbnail")
        assert thumbnail.status_code == 200 and thumbnail.content
        assert httpx.delete(f"{second}/images/{added['id']}").status_code == 204
        assert not s3fs.S3FileSystem().exists(f"images-bucket/shared/{digest}.png")
    finally:
        for server in servers:
            server.kill()
            server.wait()
