"""Slow clients against a real `imgsim serve` with its default limits: CONNECTIONS clients that
send a header line every 2 s and never finish their headers, and one client that sends its body
a byte every 2 s. Reported: the server's open file descriptors over time, /health latency
during the attack, how long the header clients stayed connected, and when the dripping body
was answered.

    python -m benchmarks.slow_clients [--connections 200] [--seconds 30]

Writes benchmarks/slow_clients.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.settings import Settings
from benchmarks.machine import cpu_model

OUT = Path(__file__).with_name("slow_clients.md")
PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


def health_ms() -> float:
    """Milliseconds one GET /health takes."""
    asked = time.perf_counter()
    httpx.get(f"{BASE}/health", timeout=10)
    return 1000 * (time.perf_counter() - asked)


def start() -> subprocess.Popen:
    """imgsim serve of the installed ImageNet model (no bundle), once it answers /health."""
    command = [sys.executable, "-m", "app.cli", "serve", "--port", str(PORT)]
    command += ["--backbone", "efficientnet_lite0", "--device", "cpu"]
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if httpx.get(f"{BASE}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("imgsim serve did not start")


def header_clients(count: int, seconds: float, lasted: list[float]) -> None:
    """count connections sending a header line every 2 s; how long each stayed open (seen
    within 0.1 s of the server closing it)."""
    socks = [socket.create_connection(("127.0.0.1", PORT)) for _ in range(count)]
    started = time.monotonic()
    for sock in socks:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
    open_ = dict(enumerate(socks))
    next_line = started + 2
    while open_ and time.monotonic() - started < seconds:
        for i, sock in list(open_.items()):
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                lasted.append(time.monotonic() - started)
                del open_[i]
            elif time.monotonic() >= next_line:
                sock.send(b"X-Slow: 1\r\n")
        if time.monotonic() >= next_line:
            next_line += 2
        time.sleep(0.1)
    lasted.extend([seconds] * len(open_))  # still open at the end
    for sock in socks:
        sock.close()


def dripping_body(answered: list[tuple[float, str]]) -> None:
    """A declared 5000-byte multipart body sent a byte every 2 s; when and how it is answered."""
    head = (
        "POST /classify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 5000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", PORT)) as sock:
        sock.sendall(head.encode() + b"--xyz\r\n")
        sock.setblocking(False)
        started = time.monotonic()
        while True:
            try:
                sock.sendall(b"x")
            except OSError:
                answered.append((time.monotonic() - started, "connection closed"))
                return
            time.sleep(2)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            answered.append((time.monotonic() - started, data.split(b"\r\n", 1)[0].decode()))
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    server = start()
    descriptors = lambda: len(os.listdir(f"/proc/{server.pid}/fd"))  # noqa: E731
    quiet = [health_ms() for _ in range(20)]
    before = descriptors()
    lasted: list[float] = []
    answered: list[tuple[float, str]] = []
    attack = threading.Thread(target=header_clients, args=(args.connections, args.seconds, lasted))
    drip = threading.Thread(target=dripping_body, args=(answered,))
    attack.start()
    drip.start()
    health, peak, started = [], before, time.monotonic()
    while drip.is_alive():  # the body takes longest: the deadline
        health.append(health_ms())
        peak = max(peak, descriptors())
        if not attack.is_alive() and "after" not in locals():
            after, after_s = descriptors(), time.monotonic() - started
        time.sleep(0.2)
    attack.join()
    server.terminate()
    server.wait(30)
    settings = Settings()
    health.sort()
    p99 = health[min(len(health) - 1, int(0.99 * len(health)))]
    OUT.write_text(
        "# Slow clients\n\n"
        f"`python -m benchmarks.slow_clients --connections {args.connections} "
        f"--seconds {args.seconds:g}`\n\n"
        f"`imgsim serve` (efficientnet_lite0, no bundle) with its default limits: header timeout "
        f"{settings.header_timeout:g} s, body stall timeout {settings.body_timeout:g} s, body "
        f"deadline {settings.body_deadline:g} s. {os.cpu_count()} cores, {cpu_model()}.\n\n"
        "| what | measured |\n|---|---|\n"
        f"| header clients (a line every 2 s) | {args.connections} |\n"
        f"| connected for (s), median / max | {statistics.median(lasted):.1f} / "
        f"{max(lasted):.1f} |\n"
        f"| server's open descriptors: before / peak / once the header clients are gone "
        f"({after_s:.0f} s) | {before} / {peak} / {after} |\n"
        f"| /health before the attack, p50 (ms) | {statistics.median(quiet):.1f} |\n"
        f"| /health during it (until the body is answered), p50 / p99 (ms), {len(health)} "
        f"requests | {statistics.median(health):.1f} / {p99:.1f} |\n"
        f"| body a byte every 2 s: answered after (s) "
        f"| {answered[0][0]:.0f}: `{answered[0][1]}` |\n"
    )
    print(OUT.read_text())


if __name__ == "__main__":
    main()
