"""The web page in a real browser: Debian's chromium, headless, driven by Playwright."""
import pathlib
import shutil

import pytest
import skimage.data

ASTRONAUT = pathlib.Path(skimage.data.__file__).parent / "astronaut.png"  # public domain, NASA
CAT = pathlib.Path(skimage.data.__file__).parent / "chelsea.png"
CHROMIUM = pathlib.Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(live_server):
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium; .ci/run does it on CI)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        page = browser.new_page()
        page.requests = []
        page.on("request", lambda r: page.requests.append(r.url))
        page.goto(live_server + "/")
        yield page
        browser.close()


def test_uploading_the_astronaut_shows_her_label_and_box(page, live_server):
    page.set_input_files("#file", str(ASTRONAUT))
    page.wait_for_selector("#faces li", timeout=60_000)
    assert page.inner_text("#status") == "1 face"
    item = page.inner_text("#faces li")
    assert item.startswith("face 1: female confidence 0.9"), item
    page.wait_for_function("document.getElementById('canvas').width === 512", timeout=30_000)
    # the box is drawn in the label's colour (#e63c8c) along the left edge of her face box, as the API gives it
    import httpx

    (face,) = httpx.post(f"{live_server}/v1/predict", files={"file": ("a.png", ASTRONAUT.read_bytes())},
                         timeout=60).json()["predictions"]
    x0, y0, _, y1 = face["box"]
    # the row of pixels across the box's left edge (a line at a fractional x shades the pixels at its ends)
    row = page.evaluate("Array.from(document.getElementById('canvas').getContext('2d')"
                        f".getImageData({round(x0) - 2}, {round((y0 + y1) / 2)}, 5, 1).data)")
    pixels = [row[i:i + 3] for i in range(0, len(row), 4)]
    assert [0xE6, 0x3C, 0x8C] in pixels, pixels
    assert all(url.startswith(live_server) or url.startswith("blob:") for url in page.requests), page.requests


def test_a_photo_without_a_face_and_a_rejected_file_get_clear_messages(page, tmp_path):
    page.set_input_files("#file", str(CAT))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('No face')", timeout=60_000)
    assert page.inner_text("#status") == "No face found in this photo." and page.inner_text("#faces") == ""
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photo")
    page.set_input_files("#file", str(notes))
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Rejected')", timeout=60_000)
    assert page.inner_text("#status") == "Rejected: notes.jpg: not an image (unrecognised format)"
    assert page.get_attribute("#status", "class") == "error"


def test_the_api_docs_render_offline(page, live_server):
    page.goto(live_server + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=60_000)
    paths = page.eval_on_selector_all(".opblock-summary-path", "els => els.map(e => e.textContent)")
    assert {"/v1/predict", "/v1/predict/batch", "/v1/model", "/healthz"} <= set(paths), paths
    assert all(url.startswith(live_server) or url.startswith("blob:") for url in page.requests), page.requests
