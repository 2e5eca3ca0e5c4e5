"""The documentation's screenshots (docs/page.png, docs/page-phone.png) of a real model.

An efficientnet_lite0 bundle trained with `imgsim train`'s defaults but --epochs (2 here, to
keep it to minutes on two cores) on the Tux Paint stamp categories of benchmarks/quality.py
(70 % of each category's drawings, split as there), indexed, served, and searched with a
held-out stamp in Debian's chromium (as tests/test_page.py drives it).

    python -m benchmarks.screenshots [--stamps DIR] [--work DIR] [--port 8765] [--epochs 2]

Needs the stamps (Debian's tuxpaint-stamps-default, see benchmarks/transfer.py) and
/usr/bin/chromium. A bundle already in WORK/bundle is reused.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.quality import BACKBONE, TEST_SHARE, categories
from benchmarks.transfer import STAMPS, copy_split
from models.layout import BundleLayout

DOCS = Path(__file__).parent.parent / "docs"
CHROMIUM = Path("/usr/bin/chromium")
QUERY_CLASS = "animals"


def imgsim(*args: str) -> list[str]:
    """The command line of the project's console script, as the shell would run it."""
    return [sys.executable, "-m", "app.cli", *args]


def prepare(stamps: Path, work: Path, epochs: int) -> tuple[Path, Path, Path]:
    """Train and index once: the class folders, the held-out ones and the bundle."""
    data, test = work / "data" / "train", work / "data" / "test"
    if not data.is_dir():
        copy_split(stamps, work / "data", TEST_SHARE, 0, categories(stamps))
    bundle = work / "bundle"
    layout = BundleLayout(bundle)
    if not layout.config.is_file():
        train = imgsim(
            "train",
            str(data),
            "--out",
            str(bundle),
            "--backbone",
            BACKBONE,
            "--epochs",
            f"{epochs}",
        )
        subprocess.run(train, check=True)
    if not layout.index.is_dir():
        subprocess.run(imgsim("index", str(data), "--model", str(bundle)), check=True)
    return data, test, bundle


def wait_until_ready(url: str, timeout: float = 120) -> None:
    """Poll /ready until the server answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout} s")


def shoot(url: str, query: Path) -> None:
    """Search by upload with heatmaps on, at a desktop's and at a phone's width."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        for name, viewport, scale, full_page in (
            ("page.png", {"width": 1280, "height": 900}, 1, True),
            ("page-phone.png", {"width": 390, "height": 844}, 2, False),
        ):
            page = browser.new_page(viewport=viewport, device_scale_factor=scale)
            page.goto(url)
            page.wait_for_selector("#gallery .tile img")
            page.set_input_files("#query-file", str(query))
            page.wait_for_selector("#predictions li")
            page.check("#explain-toggle")
            page.wait_for_function("document.querySelector('#query-overlay').naturalWidth > 0")
            if full_page:
                page.click("#neighbours .neighbour:first-child .why")
                page.wait_for_function("document.querySelector('#pair-image').naturalWidth > 0")
                page.wait_for_function(
                    "[...document.querySelectorAll('#neighbours img')]"
                    ".every(i => i.complete && i.naturalWidth)"
                )
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(DOCS / name), full_page=full_page)
            page.close()
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stamps", type=Path, default=STAMPS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/imgsim-screenshots"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs after the probe")
    args = parser.parse_args()
    _, test, bundle = prepare(args.stamps, args.work, args.epochs)
    query = sorted((test / QUERY_CLASS).iterdir())[0]
    port = str(args.port)
    server = subprocess.Popen(imgsim("serve", "--model", str(bundle), "--port", port))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url)
        shoot(url, query)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
