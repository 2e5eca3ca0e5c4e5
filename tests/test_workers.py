"""Worker processes after the parent has run libvips: train, eval and index (in process and on
Ray) finish with the default workers on a folder with large scans, and workers log as the
parent does."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from index.gallery import GalleryIndex
from models.config import WORKERS
from models.images import IN_MEMORY_PIXELS
from models.workers import loader
from tests.servers import finished

# A driver that decodes a large image with libvips in the parent (its thread pool then runs
# there, as after train's image check) and only then runs one imgsim command.
DRIVER = """\
import sys
from pathlib import Path
from app.cli import main
from models.images import load_image
load_image(Path(sys.argv[1]), draft_size=256)
sys.exit(main(sys.argv[2:]))
"""
SHAPES = {"circle": ("red", "ellipse"), "square": ("blue", "rectangle")}
BIG_SIDE = 6000  # 6000 x 6000 = 36 Mpx, over IN_MEMORY_PIXELS: libvips decodes it


def _scans(root: Path) -> Path:
    """Two class folders: small drawings and one large greyscale scan of the same shape."""
    for name, (colour, shape) in SHAPES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(8):
            image = Image.new("RGB", (64 + i, 64), "white")
            getattr(ImageDraw.Draw(image), shape)((10, 10, 50, 50), fill=colour)
            image.save(folder / f"{i}.png")
        scan = Image.new("L", (BIG_SIDE, BIG_SIDE), 255)
        getattr(ImageDraw.Draw(scan), shape)((1000, 1000, 5000, 5000), fill=0)
        scan.save(folder / "scan.png")
    return root


def _imgsim(primer: Path, argv: list[str], timeout: int) -> subprocess.CompletedProcess:
    """Run one command after libvips has run in its process; a hang fails with the log, and
    the command and its workers are killed."""
    done = finished([sys.executable, "-c", DRIVER, str(primer), *argv], timeout)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_train_eval_and_index_finish_with_default_workers_after_libvips_ran(
    tmp_path: Path,
) -> None:
    data = _scans(tmp_path / "data")
    primer = data / "circle" / "scan.png"
    assert BIG_SIDE**2 > IN_MEMORY_PIXELS and WORKERS > 0
    bundle = tmp_path / "bundle"
    train = [str(data), "--out", str(bundle), "--backbone", "efficientnet_lite0"]
    trained = _imgsim(primer, ["train", *train, "--epochs", "1"], timeout=300)
    assert "VIPS" not in trained.stderr  # libvips' messages only with --verbose
    assert "checking images: 100%" in trained.stderr and "probe features: 100%" in trained.stderr

    _imgsim(primer, ["index", str(data), "--model", str(bundle)], timeout=180)
    gallery = GalleryIndex.load(bundle / "index")
    assert len(gallery) == 18  # the scans among them

    # Ray's workers too, started by a driver whose libvips has run
    ray = ["index", str(data), "--model", str(bundle), "--out", str(tmp_path / "ray")]
    _imgsim(primer, [*ray, "--engine", "ray"], timeout=300)
    assert len(GalleryIndex.load(tmp_path / "ray")) == 18

    report_dir = tmp_path / "eval"
    _imgsim(primer, ["eval", str(data), "--model", str(bundle), "--out", str(report_dir)], 180)
    report = json.loads((report_dir / "report.json").read_text())
    assert report["top1"] == 1.0


class _Levels(Dataset):
    """One item: the effective levels of pyvips' and imgsim's loggers where it is read."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple[str, str]:
        return tuple(
            logging.getLevelName(logging.getLogger(name).getEffectiveLevel())
            for name in ("pyvips", "imgsim")
        )


def test_workers_log_at_the_parents_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """libvips' chatter hidden in the parent stays hidden in workers; imgsim's INFO shows."""
    monkeypatch.setattr(logging.getLogger("pyvips"), "level", logging.WARNING)
    monkeypatch.setattr(logging.getLogger(), "level", logging.INFO)
    assert list(loader(_Levels(), 1, batch_size=None)) == [["WARNING", "INFO"]]
