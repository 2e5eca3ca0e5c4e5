"""Start `imgsim serve` in a child process on a free loopback port, as a user would; run a
command to its end under a timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx
import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    bundle_dir: Path,
    index_dir: Path | None,
    port: int,
    env: dict[str, str] | None = None,
    options: Sequence[str] = (),
) -> subprocess.Popen:
    """imgsim serve in a child process (with index_dir, or BUNDLE/index when it exists, and any
    further options), returned once it answers /health."""
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(bundle_dir)]
    command += ["--index", str(index_dir)] if index_dir is not None else []
    command += ["--port", str(port), "--device", "cpu", *options]
    # Its log goes to a file: a pipe nobody reads would block the server once full.
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return answering(process, f"http://127.0.0.1:{port}", "imgsim serve", log)


def answering(process: subprocess.Popen, base: str, name: str, log: IO[str]) -> subprocess.Popen:
    """The server process once it answers GET base/health (within 120 s); raises, with the log
    it writes to, if it exits or does not answer by then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"{name} exited:\n{log.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"{name} did not answer /health within 120 s")


def finished(
    command: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in a session of its own, its output captured; one that runs past timeout
    seconds fails the test with its stderr. Whatever it started (workers, Ray's processes) is
    killed with it, so that nothing outlives the test."""
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            _, err = process.communicate()
            pytest.fail(f"{' '.join(command[3:])} did not finish in {timeout} s:\n{err}")
        finally:
            _kill_group(process.pid)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _kill_group(group: int) -> None:
    """A killed command's children may outlive it for a moment (Ray's): kill them too."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.2)
