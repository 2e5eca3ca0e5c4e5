"""`imgsim index` exits non-zero when nothing could be indexed and names what it skipped."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from app.cli import main
from index.gallery import GalleryIndex
from models.backbones import Preprocessing
from models.bundle import Bundle, BundleConfig
from models.network import build_net
from tests.synthetic import noise_png


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained resnet18 bundle at 32 px: quick to load and to run."""
    pre = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    config = BundleConfig(backbone="resnet18", classes=["a", "b"], preprocessing=pre, embed_dim=8)
    directory = tmp_path_factory.mktemp("cli-exit") / "bundle"
    Bundle(config, build_net("resnet18", 2, "none", embed_dim=8), "cpu").save(directory)
    return directory


def index(folder: Path, bundle_dir: Path, out: Path) -> int:
    return main(
        ["index", str(folder), "--model", str(bundle_dir), "--out", str(out)]
        + ["--device", "cpu", "--workers", "0"]
    )


def bad_files(folder: Path) -> list[str]:
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "empty.png").write_bytes(b"")
    (folder / "a" / "text.jpg").write_bytes(b"not an image at all")
    (folder / "a" / "cut.png").write_bytes(noise_png(1)[:200])
    return ["empty.png", "text.jpg", "cut.png"]


def test_nothing_indexed_exits_non_zero_in_one_paragraph(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = bad_files(tmp_path / "gallery")
    assert index(tmp_path / "gallery", bundle_dir, tmp_path / "out") == 2
    out, err = capsys.readouterr()
    text = " ".join(err.split())
    assert "none of the 3 image files" in text and "could be indexed" in text
    assert all(name in text for name in names) and "Traceback" not in err
    assert "indexed 0 images" not in out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.building-*"))


def test_a_bad_new_file_beside_indexed_ones_is_a_warning_not_a_failure(
    bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "gallery" / "a").mkdir(parents=True)
    (tmp_path / "gallery" / "a" / "good.png").write_bytes(noise_png(2))
    assert index(tmp_path / "gallery", bundle_dir, tmp_path / "out") == 0
    assert index(tmp_path / "gallery", bundle_dir, tmp_path / "out") == 0  # nothing new: fine
    (tmp_path / "gallery" / "a" / "bad.png").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING):
        assert index(tmp_path / "gallery", bundle_dir, tmp_path / "out") == 0
    assert "skipping 1 unreadable file(s)" in caplog.text and "bad.png" in caplog.text
    fingerprint = Bundle.load(bundle_dir, "cpu").fingerprint
    gallery = GalleryIndex.load(tmp_path / "out", fingerprint)
    assert len(gallery) == 1  # left as it was
    gallery.close()


def special_entries(folder: Path) -> dict[str, str]:
    """A FIFO, a broken link, a link to the FIFO and a link loop, each named like an image."""
    (folder / "a").mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "a" / "pipe.png")
    (folder / "a" / "gone.png").symlink_to(folder / "nowhere.png")
    (folder / "a" / "to-pipe.jpg").symlink_to(folder / "a" / "pipe.png")
    (folder / "a" / "loop.png").symlink_to(folder / "a" / "loop.png")
    return {
        "pipe.png": "a FIFO, not a regular file",
        "gone.png": "a broken symbolic link",
        "to-pipe.jpg": "a symbolic link to a FIFO, not a regular file",
        "loop.png": "a symbolic link that cannot be followed",
    }


def test_links_and_special_files_are_listed_in_the_warning(
    bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = special_entries(tmp_path / "gallery")
    (tmp_path / "gallery" / "a" / "good.png").write_bytes(noise_png(3))
    (tmp_path / "gallery" / "a" / "bad.png").write_bytes(b"broken")
    with caplog.at_level(logging.WARNING):
        assert index(tmp_path / "gallery", bundle_dir, tmp_path / "out") == 0
    assert "indexed 1 images" in capsys.readouterr().out
    [warning] = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert (
        "skipping 5 unreadable file(s)" in warning
        and "bad.png (the file is not an image" in warning
    )
    for name, why in expected.items():
        assert f"{name} ({why}" in warning


def test_only_special_files_exits_non_zero_naming_them(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = special_entries(tmp_path / "gallery")
    assert index(tmp_path / "gallery", bundle_dir, tmp_path / "out") == 2
    text = " ".join(capsys.readouterr().err.split())
    assert "holds no image files" in text
    for name, why in expected.items():
        assert f"{name} ({why}" in text
