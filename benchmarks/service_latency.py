"""Latency of POST /classify and POST /similar through a real `imgsim serve` on loopback.

Starts the server as a user would, waits for /health, then sends each image of a folder one at
a time (no concurrency) to both endpoints and reports p50/p95/mean in milliseconds, client side,
including multipart upload, decoding, the forward pass and (for /similar) the FAISS search.

    python benchmarks/service_latency.py --model BUNDLE --images DIR [--requests 100]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from models.data import find_images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, device: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--device",
        device,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not come up within 180 s")


def measure(url: str, images: list[Path], warmup: int = 3) -> dict[str, float]:
    timings = []
    with httpx.Client(timeout=60) as client:
        for i, path in enumerate(images):
            files = {"file": (path.name, path.read_bytes(), "image/png")}
            started = time.perf_counter()
            response = client.post(url, files=files)
            elapsed = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if i >= warmup:
                timings.append(elapsed)
    timings.sort()
    return {
        "requests": len(timings),
        "p50_ms": round(statistics.median(timings), 1),
        "p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 1),
        "mean_ms": round(statistics.fmean(timings), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    images = find_images(args.images)[:: max(1, len(find_images(args.images)) // args.requests)]
    images = images[: args.requests]
    port = free_port()
    server = start_server(args.model, port, args.device)
    try:
        base = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{base}/health").json()
        results = {
            "backbone": health["backbone"],
            "device": health["device"],
            "index_size": health["index_size"],
            "cpu_count": os.cpu_count(),
            "classify": measure(f"{base}/classify", images),
            "similar": measure(f"{base}/similar?k=10", images),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(results, indent=2))
    print("\n| endpoint | requests | p50 ms | p95 ms | mean ms |\n|---|---|---|---|---|")
    for endpoint in ("classify", "similar"):
        r = results[endpoint]
        print(f"| /{endpoint} | {r['requests']} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_ms']} |")


if __name__ == "__main__":
    main()
