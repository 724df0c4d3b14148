"""The web console at /, end to end in a real headless browser (Debian's chromium driven by playwright) against a
real `asif serve` on loopback, over a small real index built here (packaged encoders, a Flickr8k subset).

Needs ../shared/data (Flickr8k, Imagenette), the `playwright` package and /usr/bin/chromium. Where one is missing the
tests skip, unless ASIF_REQUIRE_BROWSER=1 (set by .ci/run), which turns a missing piece into a failure.
ASIF_SCREENSHOTS=1 also writes the screenshots shown in docs/console.md (and the README) to docs/.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ROOT, Server, build_command

SHARED = Path(os.environ.get("ASIF_SHARED_DATA", ROOT.parent / "shared" / "data"))
FLICKR = SHARED / "flickr8k"
CHROMIUM = os.environ.get("ASIF_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("ASIF_REQUIRE_BROWSER") == "1"
SCREENSHOTS = os.environ.get("ASIF_SCREENSHOTS") == "1"
N_IMAGES = 300  # Flickr8k photos in the index (1,500 pairs)
# An Imagenette "English springer" photo: a dog, among labels Flickr8k's pairs know well.
DOG = SHARED / "imagenette" / "val" / "n02102040" / "ILSVRC2012_val_00004650.jpg"
LABELS = ["dog", "church", "truck", "parachute"]
KEY = "console-test-key"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    if not (FLICKR / "captions.csv").exists() or not DOG.exists():
        return f"no Flickr8k/Imagenette under {SHARED}"
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    why = _missing()
    if why:
        if REQUIRED:
            pytest.fail(f"ASIF_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("console")
    with open(FLICKR / "captions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = sorted({r["image"] for r in rows})[:N_IMAGES]
    keep = set(names)
    pairs = tmp / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        writer.writerows([r["image"], r["caption"]] for r in rows if r["image"] in keep)
    out = tmp / "index"
    cmd = build_command(pairs, FLICKR / "images", out, "effnet-lite0", "minilm", "--no-auto")  # the paper's k, p
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def server(index_folder) -> Iterator[Server]:
    srv = Server(index_folder)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def protected_server(index_folder, tmp_path_factory) -> Iterator[Server]:
    copy = tmp_path_factory.mktemp("protected") / "index"
    shutil.copytree(index_folder, copy)
    srv = Server(copy, env={"ASIF_API_KEY": KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


class Console:
    """One browser page on the console, recording every request that leaves the server's origin."""

    def __init__(self, browser, server: Server, width: int = 1200) -> None:
        self.base = f"http://127.0.0.1:{server.port}"
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.external: list[str] = []
        self.page.on("request", self._request)
        self.page.goto(self.base + "/")
        self.page.wait_for_selector("#info dt:text('Pairs')")

    def _request(self, request) -> None:
        if not request.url.startswith((self.base + "/", "blob:", "data:")):
            self.external.append(request.url)

    def classify(self, image: Path, labels: list[str]) -> None:
        page = self.page
        page.set_input_files("#images", str(image))
        page.fill("#labels", "\n".join(labels))
        page.click("#classify-btn")
        page.wait_for_selector(".result h3")

    def explained_ids(self) -> list[int]:
        ids = self.page.eval_on_selector_all(".explanation .pair", "els => els.map(e => e.dataset.pair)")
        return [int(x) for x in ids]

    def scores(self) -> list[str]:
        return self.page.eval_on_selector_all(".scores .value", "els => els.map(e => e.textContent)")

    def shot(self, name: str) -> None:
        if SCREENSHOTS:
            (ROOT / "docs").mkdir(exist_ok=True)
            from playwright.sync_api import TimeoutError as PlaywrightTimeout

            # thumbnails drawn (lazy ones off screen may never load: then after 5 s as they are)
            with contextlib.suppress(PlaywrightTimeout):
                self.page.wait_for_function("() => [...document.images].every(i => i.complete)", timeout=5000)
            self.page.screenshot(path=str(ROOT / "docs" / name), full_page=True)

    def close(self) -> None:
        assert not self.external, f"the page made external requests: {self.external}"
        self.context.close()


@pytest.fixture
def console(browser, server) -> Iterator[Console]:
    c = Console(browser, server)
    yield c
    c.close()


def test_classify_an_imagenette_photo_shows_the_label_and_its_explanation(console):
    console.classify(DOG, LABELS)
    page = console.page
    assert page.inner_text(".result h3") == "dog"
    assert len(console.scores()) == len(LABELS)
    # The explanation gallery: thumbnails that really loaded, with captions and shares of the score.
    page.wait_for_function(
        "() => { const imgs = [...document.querySelectorAll('.explanation img')];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )
    assert "dog" in page.inner_text(".explanation").lower()
    assert re.search(r"\d+\.\d% of the score", page.inner_text(".explanation"))
    # The image's own nearest anchors come from the image index.
    page.wait_for_selector("#nearest-0 .pair img")
    # Another label explained on click.
    page.click(".scores button:has-text('church')")
    page.wait_for_selector("h4:has-text('Why “church”')")
    console.shot("console-classify.png")


def test_options_choose_the_weighting_and_the_views(console):
    console.classify(DOG, LABELS)
    page = console.page
    power = console.scores()
    assert "power p=8" in page.inner_text("#results > p.meta")
    page.click("summary:has-text('Options')")
    page.select_option("#weighting", "softmax")
    assert page.inner_text("#param-name") == "t" and page.get_attribute("#p", "placeholder") == "0.1 (default)"
    page.check("#augment")
    page.click("#classify-btn")
    page.wait_for_selector("#results > p.meta:has-text('softmax t=0.1')")
    assert page.inner_text(".result h3") == "dog" and console.scores() != power
    console.shot("console-options.png")


def test_balance_the_batch_option(console):
    """Two or more images with "balance the batch": the request asks for balancing and the answer says so; the
    scores shown are the balanced probabilities, not the ASIF scores."""
    page = console.page
    two = [str(DOG), str(next((SHARED / "imagenette" / "val" / "n03028079").glob("*.jpg")))]
    page.set_input_files("#images", two)
    page.fill("#labels", "\n".join(LABELS))
    page.click("#classify-btn")
    page.wait_for_selector(".result h3")
    plain = console.scores()
    assert "batch balanced" not in page.inner_text("#results > p.meta")
    page.click("summary:has-text('Options')")
    page.check("#balance")
    page.click("#classify-btn")
    page.wait_for_selector("#results > p.meta:has-text('batch balanced')")
    assert console.scores() != plain


def test_forget_a_contributing_pair_then_undo(console):
    console.classify(DOG, LABELS)
    page = console.page
    before_ids, before_scores = console.explained_ids(), console.scores()
    victim = before_ids[0]
    page.click(f".explanation .pair[data-pair='{victim}'] button:has-text('Forget')")
    page.wait_for_selector("#toast:has-text('forgotten')")
    page.wait_for_function(
        f"() => ![...document.querySelectorAll('.explanation .pair')].some(e => e.dataset.pair === '{victim}')"
    )
    assert victim not in console.explained_ids()
    assert console.scores() != before_scores, "the answer was recomputed without the pair"
    console.shot("console-forget.png")
    page.click("#toast button:has-text('Undo')")
    page.wait_for_selector("#toast:has-text('is back as')")
    restored = int(re.search(r"back as #(\d+)", page.inner_text("#toast")).group(1))
    page.wait_for_function(
        f"() => [...document.querySelectorAll('.explanation .pair')].some(e => e.dataset.pair === '{restored}')"
    )
    assert console.scores() == before_scores, "restoring the pair brings the scores back"


def test_add_a_pair_and_see_it_in_the_next_explanation(console):
    page = console.page
    # A Flickr8k photo outside the index, with a caption of its own.
    held = sorted(p.name for p in (FLICKR / "images").iterdir())[N_IMAGES + 7]
    image = FLICKR / "images" / held
    caption = "a photo added live from the console"
    page.click("#tab-collection")
    page.set_input_files("#add-image", str(image))
    page.fill("#add-captions", caption)
    page.click("#add-form button[type=submit]")
    page.wait_for_selector("#toast:has-text('Added pair')")
    new_id = int(re.search(r"#(\d+)", page.inner_text("#toast")).group(1))
    page.click("#tab-classify")
    page.click("summary:has-text('Options')")
    page.fill("#templates", "{}")
    console.classify(image, [caption, "church", "truck"])
    assert page.inner_text(".result h3") == caption
    assert new_id in console.explained_ids()


def test_search_by_text_and_browse(console):
    page = console.page
    page.click("#tab-collection")
    page.wait_for_selector("#pairs .pair")
    page.fill("#search-text", "a dog running on the grass")
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#search-results .pair")
    captions = page.eval_on_selector_all("#search-results .caption", "els => els.map(e => e.textContent)")
    assert len(captions) == 12 and sum("dog" in c.lower() for c in captions) >= 8, captions
    first_page = page.eval_on_selector_all("#pairs .pair", "els => els.map(e => e.dataset.pair)")
    page.click("#pairs-next")
    page.wait_for_function(f"() => document.querySelector('#pairs .pair')?.dataset.pair !== '{first_page[0]}'")
    console.shot("console-collection.png")


def test_a_bad_file_shows_an_error_in_words(console, tmp_path):
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("this is text, not a JPEG")
    page = console.page
    page.set_input_files("#images", str(bad))
    page.fill("#labels", "dog\ncat")
    page.click("#classify-btn")
    page.wait_for_selector("#status:not([hidden])")
    assert "not a recognised image format (HTTP 400)" in page.inner_text("#status")
    assert page.inner_text("h1").startswith("asif"), "the page stays up"


def test_the_api_key_is_asked_once_on_a_protected_server(browser, protected_server):
    console = Console(browser, protected_server)
    page = console.page
    assert "need an API key" in page.inner_text("#info")
    page.click("#tab-labelsets")
    page.fill("#ls-name", "animals")
    page.fill("#ls-labels", "dog\ncat\nhorse")
    page.click("#labelset-form button[type=submit]")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", KEY)
    page.click("#key-ok")
    page.wait_for_selector("#toast:has-text('Label set animals saved')")
    assert page.evaluate("sessionStorage.getItem('asif-api-key')") == KEY
    page.wait_for_selector(".sets summary:has-text('animals')")
    console.shot("console-labelsets.png")
    # The key is kept: a second write does not ask again.
    page.click(".sets button:has-text('Delete')")
    page.wait_for_selector("#toast:has-text('deleted')")
    assert not page.is_visible("#key-dialog")
    console.close()


def test_the_page_fits_360px_and_works_from_the_keyboard(browser, server):
    console = Console(browser, server, width=360)
    page = console.page
    console.classify(DOG, LABELS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.wait_for_selector("#nearest-0 .pair img")
    console.shot("console-mobile.png")
    # Tabs by keyboard: focus the first tab, arrow right opens the next view.
    page.focus("#tab-classify")
    page.keyboard.press("ArrowRight")
    assert page.is_visible("#view-collection") and not page.is_visible("#view-classify")
    console.close()
