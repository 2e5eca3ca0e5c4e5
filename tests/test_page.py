"""The page at / in a real browser (Debian's chromium, headless) against `imgsim serve`.

Set IMGSIM_SCREENSHOTS=DIR to keep its screenshots there (the documentation's own, of a real model,
come from python -m benchmarks.screenshots).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.stages import index_folder
from models.bundle import Bundle
from tests.servers import free_port, start_server
from tests.synthetic import noise_png

CHROMIUM = Path("/usr/bin/chromium")
KEY = "page-test-key"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="the browser tests need Debian's chromium at /usr/bin/chromium "
        "(apt-get install -y chromium; .ci/run installs it)",
    ),
]


@pytest.fixture(scope="module")
def server(
    trained_bundle_dir: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("page")
    bundle_dir = folder / "bundle"
    shutil.copytree(trained_bundle_dir, bundle_dir, ignore=shutil.ignore_patterns("index"))
    index_folder(shapes_dir, Bundle.load(bundle_dir, "cpu"), bundle_dir / "index", workers=0)
    port = free_port()
    process = start_server(bundle_dir, bundle_dir / "index", port, env={"IMGSIM_API_KEY": KEY})
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


def screenshot(page: object, name: str, tmp_path: Path, full_page: bool = True) -> None:
    target = Path(os.environ.get("IMGSIM_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / name), full_page=full_page)


LOADED = (  # how many images of a selector have loaded, with pixels
    "s => [...document.querySelectorAll(s)].filter(i => i.complete && i.naturalWidth).length"
)


def search_by_upload(page: object, image: Path) -> None:
    page.set_input_files("#query-file", str(image))
    page.wait_for_selector("#predictions li")
    page.wait_for_function(  # the thumbnails load lazily: the first is in view
        "document.querySelector('#neighbours img')?.naturalWidth > 0"
    )


def test_search_explain_and_browse(
    server: str, browser: object, shapes_dir: Path, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    assert "resnet18" in page.inner_text("#model-title + .facts")
    assert not page.is_visible("#result")  # no empty result panel before a search
    page.wait_for_selector("#gallery .tile img")
    assert page.locator("#gallery .tile").count() == 24  # the first page of 40 images
    page.click("#next")
    page.wait_for_function("document.querySelector('#page-info').textContent.startsWith('25')")
    assert page.locator("#gallery .tile").count() == 16

    search_by_upload(page, shapes_dir / "star" / "star_002.png")
    predictions = page.locator("#predictions li")
    assert 1 <= predictions.count() <= 5
    assert page.inner_text("#predictions li:first-child .name") in {
        "circle", "square", "star", "triangle"
    }  # fmt: skip
    assert page.locator("#neighbours .neighbour").count() == 12
    page.locator("#neighbours .neighbour:last-child").scroll_into_view_if_needed()
    page.wait_for_function(f"({LOADED})('#neighbours img') === 12")
    assert "/tmp/" not in page.content()

    page.check("#explain-toggle")
    page.wait_for_selector("#query-overlay:not([hidden])")
    page.wait_for_function("document.querySelector('#query-overlay').naturalWidth > 0")
    page.click("#neighbours .neighbour:first-child .why")
    page.wait_for_selector("#pair:not([hidden])")
    page.wait_for_function("document.querySelector('#pair-image').naturalWidth > 0")
    assert "similarity" in page.inner_text("#pair-caption")
    screenshot(page, "page.png", tmp_path)

    first = page.get_attribute("#neighbours .neighbour:first-child", "data-id")
    page.click("#neighbours .neighbour:first-child button.open")
    page.wait_for_function(
        f"document.querySelector('#query-caption').textContent.includes('#{first}')"
    )
    page.wait_for_function(
        f"!document.querySelector('#neighbours [data-id=\"{first}\"]')"
        " && document.querySelectorAll('#neighbours .neighbour').length === 12"
    )
    page.select_option("#label-filter", "circle")
    page.wait_for_function(
        "[...document.querySelectorAll('#neighbours .label')].every(l => l.textContent === "
        "'circle') && document.querySelectorAll('#neighbours .neighbour').length === 10"
    )
    page.close()


def test_add_and_delete_with_the_key(server: str, browser: object, tmp_path: Path) -> None:
    image = tmp_path / "noise.png"
    image.write_bytes(noise_png(3, 64))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(server)
    page.wait_for_selector("#gallery .tile")
    size = int(page.inner_text("#index-size"))
    page.set_input_files("#add-files", str(image))
    page.fill("#add-label", "noise")
    page.fill("#api-key", "wrong")
    page.click("#add-form button[type=submit]")
    page.wait_for_function("document.querySelector('#add-status').textContent.includes('key')")

    page.fill("#api-key", KEY)
    page.set_input_files("#add-files", str(image))
    page.fill("#add-label", "noise")
    page.click("#add-form button[type=submit]")
    page.wait_for_function("document.querySelector('#add-status').textContent.includes('Added 1')")
    # The count pill and the index line both say the new size, once the gallery has reloaded.
    shown = "[...document.querySelectorAll('#size-pill, #index-size')].map(e => e.textContent)"
    page.wait_for_function(f"({shown}).join('|') === '{size + 1} images|{size + 1}'")
    page.select_option("#gallery-label", "noise")
    page.wait_for_function("document.querySelectorAll('#gallery .tile').length === 1")
    page.click("#gallery .tile .delete")
    page.wait_for_function("document.querySelector('#add-status').textContent.includes('Deleted')")
    page.wait_for_function("document.querySelectorAll('#gallery .tile').length === 0")
    page.wait_for_function(f"({shown}).join('|') === '{size} images|{size}'")
    page.close()


def test_the_page_fits_a_phone(
    server: str, browser: object, shapes_dir: Path, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    page.goto(server)
    page.wait_for_selector("#gallery .tile img")
    search_by_upload(page, shapes_dir / "triangle" / "triangle_001.png")
    page.check("#explain-toggle")
    page.wait_for_function("document.querySelector('#query-overlay').naturalWidth > 0")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways: {width} px wide"
    page.evaluate("window.scrollTo(0, 0)")
    screenshot(page, "page-phone.png", tmp_path, full_page=False)
    page.close()


def test_a_new_class_from_search_results_and_from_files(
    server: str, browser: object, shapes_dir: Path, tmp_path: Path
) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server)
    page.fill("#api-key", KEY)
    search_by_upload(page, next((shapes_dir / "star").glob("*.png")))
    page.fill("#class-name", "starlike")
    page.check("#class-from-results")
    page.click("#class-form button[type=submit]")
    page.wait_for_function("document.querySelector('#class-status').textContent.includes('Added')")
    added = page.text_content("#added-classes")  # in the closed classes panel
    assert "starlike" in added and "added from 12 image(s)" in added  # the 12 neighbours shown
    # The search ran again: the classifier answers with the new class.
    names = "[...document.querySelectorAll('#predictions .name')].map(e => e.textContent)"
    page.wait_for_function(f"{names}.includes('starlike')")

    image = tmp_path / "noise.png"
    image.write_bytes(noise_png(5, 64))
    page.fill("#class-name", "starlike")  # taken: said, nothing added
    page.set_input_files("#class-files", str(image))
    page.click("#class-form button[type=submit]")
    page.wait_for_function(
        "document.querySelector('#class-status').textContent.includes('already')"
    )
    page.fill("#class-name", "speckles")
    page.set_input_files("#class-files", str(image))
    page.click("#class-form button[type=submit]")
    page.wait_for_function(
        "document.querySelector('#added-classes').textContent.includes('speckles')"
    )
    assert page.text_content("#class-count") == "6"
    page.close()
