"""A full disk on every write path, on a real one: a small tmpfs mounted for the test (as root,
as CI runs; skipped elsewhere). Deletes are refused and keep the item, the snapshot writer
logs the episode once and tries again later, closing still closes, a backup leaves nothing."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from app.cli import main
from index.errors import InsufficientStorage
from index.gallery import GalleryIndex
from models.bundle import Bundle
from tests.servers import answering, free_port
from tests.synthetic import noise_png
from tests.test_index_files import _item, collection, vectors


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """An empty 4 MiB tmpfs, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if not mounted or mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; returns it (delete it to free the disk)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        for chunk in (2**16, 2**12, 1):
            try:
                while True:
                    file.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
    return filler


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that end a thread, which would otherwise only be printed."""
    caught: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def test_a_delete_on_a_full_disk_is_refused_and_keeps_the_item(disk: Path) -> None:
    collection(disk / "index", n=60)  # closed: its WAL merged, so a delete must grow it
    gallery = GalleryIndex.load(disk / "index", "model-a")
    filler = fill(disk)
    with pytest.raises(InsufficientStorage, match="the deletion of image 7 could not be stored"):
        gallery.delete(7)
    assert len(gallery) == 60 and gallery.get(7).id == 7 and gallery.consistent()
    filler.unlink()
    gallery.delete(7)
    assert len(gallery) == 59
    gallery.close()


def test_the_snapshot_writer_survives_a_full_disk_and_tries_again_later(
    disk: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[BaseException],
) -> None:
    caplog.set_level(logging.INFO, "index.snapshot")
    gallery = collection(disk / "index", n=60, close=False)  # no snapshot yet: every 10,000
    snapshots = gallery._snapshots
    snapshots.every = 1
    filler = fill(disk)
    for _ in range(3):  # the first fails; the next, before RETRY_AFTER_S, are not tried
        snapshots.soon(gallery.last_change, gallery._captured)
        snapshots.wait()
    assert thread_errors == [] and snapshots.seq == 0
    full = [r for r in caplog.records if "no snapshot written" in r.message]
    assert len(full) == 1 and full[0].levelno == logging.ERROR
    assert not list((disk / "index").glob(".*tmp"))  # no half-written file fills it further
    filler.unlink()
    monkeypatch.setattr(snapshots, "_retry_at", 0.0)
    snapshots.soon(gallery.last_change, gallery._captured)
    snapshots.wait()
    assert snapshots.seq == gallery.last_change and "snapshots written again" in caplog.text
    gallery.close()


def test_closing_on_a_full_disk_closes_and_loses_nothing(
    disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gallery = collection(disk / "index", n=60, close=False)
    gallery.add(vectors(1, 99), [_item(gallery, 99)], contents=[b"late"])
    filler = fill(disk)
    gallery.close()  # no snapshot and maybe no WAL merge: said, not raised
    assert "no snapshot of changes 1-" in caplog.text
    filler.unlink()
    reopened = GalleryIndex.load(disk / "index", "model-a")
    assert len(reopened) == 61 and reopened.consistent()
    reopened.close()


def test_a_backup_onto_a_full_disk_fails_in_a_paragraph_and_leaves_nothing(
    disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collection(tmp_path / "index", n=300)
    fill(disk)
    assert main(["backup", str(tmp_path / "index"), str(disk / "copy")]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "Traceback" not in err and "\n\n" not in err.strip()
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_a_server_stopped_on_a_full_disk_exits_cleanly_and_loses_nothing(
    disk: Path, tmp_path: Path, untrained_bundle: Callable[[Path], Path]
) -> None:
    """SIGTERM with changes not yet in a snapshot and a full disk: a clean shutdown, the log says
    what was not written, and on the freed disk every acknowledged image is there."""
    bundle = untrained_bundle(tmp_path / "bundle")
    GalleryIndex.create(512, Bundle.load(bundle, "cpu").fingerprint, disk / "index").close()
    port, log = free_port(), tempfile.TemporaryFile("w+")
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(bundle)]
    command += ["--index", str(disk / "index"), "--port", str(port), "--device", "cpu"]
    command += ["--runtime", "torch"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    answering(process, f"http://127.0.0.1:{port}", "imgsim serve", log)
    files = [("files", (f"{i}.png", noise_png(i, 32), "image/png")) for i in range(3)]
    assert httpx.post(f"http://127.0.0.1:{port}/images", files=files).status_code == 201
    filler = fill(disk)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    log.seek(0)
    text = log.read()
    assert "Application shutdown complete" in text
    assert "shutdown failed" not in text and "Traceback" not in text
    assert "no snapshot of changes 1-3 was written" in text
    filler.unlink()
    reopened = GalleryIndex.load(disk / "index")
    assert len(reopened) == 3 and reopened.consistent()
    reopened.close()
