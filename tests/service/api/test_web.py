"""The web page at / end to end: Debian's headless Chromium, driven by Playwright, against
`geoloc serve` started as a real process on loopback with the bundled bluemarble model.

Needs the built page assets (`make install`: npm ci + python -m service.api.webpage build) and
/usr/bin/chromium (`make system-deps`); without either these tests are skipped, saying why.
Screenshots are written under the test's tmp_path (the path is printed; `pytest -s` shows it).
With GEOLOC_DOC_SCREENSHOTS=docs/img the README's screenshots are written there too (PNG,
256 colours, under 300 KB):

    GEOLOC_DOC_SCREENSHOTS=docs/img pytest tests/service/api/test_web.py
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from api_helpers import IndexData
from fastapi.testclient import TestClient
from PIL import Image

from encoders.bluemarble import render_tile
from index.geo import haversine_km
from service.api.main import create_app
from service.api.webpage import NODE_MODULES
from service.config import Settings
from service.db import create_api_key, make_engine, make_sessionmaker
from service.engine.negatives import negatives
from tests.deploy.cluster import Replica, replica_env
from tests.net import free_port
from tests.service.api.browser import browser_missing, chromium

pytest_plugins = ["api_fixtures"]  # the bluemarble model and a small H3 index

AXE = NODE_MODULES / "axe-core" / "axe.min.js"
SAHARA = (23.0, 12.0)  # a distinctive desert view the bundled model places well
AUSTRALIA = (-25.0, 134.0)
TIMEOUT_MS = 60_000

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")


def _skip_reason() -> str | None:
    reason = browser_missing()
    if reason is not None:
        return reason
    if not AXE.exists():
        return f"{AXE} is missing: make install (npm ci in service/web)"
    return None


# -- a real server ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    url: str
    db_url: str


@contextmanager
def geoloc_serve(data_dir: Path, db_path: Path, ready: str, **env: str) -> Iterator[Server]:
    """`geoloc serve` on a free loopback port, on its own SQLite database; stops it after."""
    db_url = f"sqlite:///{db_path}"
    settings = {f"GEOLOC_{k.upper()}": v for k, v in env.items()}
    replica = Replica(
        "web",
        free_port(),
        replica_env(
            data_dir,
            db_url,
            GEOLOC_INDEX_POLL_S="0",
            GEOLOC_WEB_ASSETS_DIR=str(Settings().web_assets_path),
            **settings,
        ),
        db_path.parent / "serve.log",
    )
    replica.start()
    try:
        replica.wait_ready(180, path=ready)
        yield Server(replica.url, db_url)
    finally:
        replica.stop()


@pytest.fixture(scope="module")
def server(bm_index: IndexData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Auth off, the defaults: what `make run` serves."""
    tmp = tmp_path_factory.mktemp("web-open")
    with geoloc_serve(bm_index.data_dir, tmp / "geoloc.db", "/readyz") as s:
        yield s


@pytest.fixture(scope="module")
def locked_server(
    bm_index: IndexData, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """API keys on, 1 request a minute, 100 kB requests, and an index that does not exist:
    every error a page user can meet, from a real server (a locate that passes the key check
    gets 503 not-ready)."""
    tmp = tmp_path_factory.mktemp("web-locked")
    with geoloc_serve(
        bm_index.data_dir,
        tmp / "geoloc.db",
        "/healthz",
        auth_enabled="true",
        rate_limit_per_minute="1",
        max_request_bytes=str(100_000),
        index_name="no-such-index",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def judged_server(judged: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The defaults, serving the index version that has a fitted localizability verdict."""
    tmp = tmp_path_factory.mktemp("web-judged")
    with geoloc_serve(
        judged.data_dir, tmp / "geoloc.db", "/readyz", index_version=judged.versions[0]
    ) as s:
        yield s


# -- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with chromium() as b:
        yield b


@dataclass
class Page:
    page: object
    requests: list[str]
    file_choosers: list[object]

    def off_loopback(self) -> list[str]:
        out = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob"):
                continue
            if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                out.append(url)
        return out


@pytest.fixture
def open_page(browser: object) -> Iterator[object]:
    contexts = []

    def opener(server: Server, viewport: tuple[int, int] = (1400, 900)) -> Page:
        size = {"width": viewport[0], "height": viewport[1]}
        ctx = browser.new_context(viewport=size)  # type: ignore[attr-defined]
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        seen: list[str] = []
        choosers: list[object] = []
        page.on("request", lambda r: seen.append(r.url))
        # Listening before the page loads intercepts every file chooser from the start.
        page.on("filechooser", lambda chooser: choosers.append(chooser))
        page.goto(server.url + "/")
        page.wait_for_function("window.geoloc && document.querySelector('.geoloc-borders')")
        return Page(page, seen, choosers)

    yield opener
    for ctx in contexts:
        ctx.close()


def _tile(path: Path, lat: float, lon: float, gps: tuple[float, float] | None = None) -> Path:
    img = render_tile(lat, lon, 2.0, 64)
    if gps is None:
        img.save(path)
        return path
    exif = Image.Exif()
    ifd = exif.get_ifd(0x8825)  # GPS IFD
    ifd.update(
        {
            1: "N" if gps[0] >= 0 else "S",
            2: (abs(gps[0]), 0.0, 0.0),
            3: "E" if gps[1] >= 0 else "W",
            4: (abs(gps[1]), 0.0, 0.0),
        }
    )
    img.save(path, "JPEG", quality=92, exif=exif)
    return path


def _axe(page: object) -> list[dict]:
    page.add_script_tag(path=str(AXE))  # type: ignore[attr-defined]
    result = page.evaluate("async () => (await axe.run(document)).violations")  # type: ignore[attr-defined]
    return [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"][:3]]}
        for v in result
    ]


DOC_BYTES = 300_000  # the most a README screenshot may weigh


def _screenshot(page: object, path: Path, doc: str | None = None) -> None:
    """A screenshot under tmp_path; with `doc`, also the README's docs/img/<doc> when
    GEOLOC_DOC_SCREENSHOTS names that folder."""
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    print(f"\nscreenshot: {path}")
    assert path.stat().st_size > 10_000
    folder = os.environ.get("GEOLOC_DOC_SCREENSHOTS")
    if doc and folder:
        _small_png(path, Path(folder) / doc)


def _small_png(src: Path, dst: Path) -> None:
    """256 colours (the satellite map dithered), scaled down until it weighs under DOC_BYTES."""
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    scale = 1.0
    while True:
        size = (round(rgb.width * scale), round(rgb.height * scale))
        small = rgb if scale == 1.0 else rgb.resize(size, Image.Resampling.LANCZOS)
        small.quantize(256, method=Image.Quantize.FASTOCTREE).save(dst, "PNG", optimize=True)
        if dst.stat().st_size < DOC_BYTES:
            break
        scale *= 0.9
    print(f"README screenshot: {dst} ({dst.stat().st_size // 1024} KB)")


TOP_MARKER = "[geoloc.markers[0].getLatLng().lat, geoloc.markers[0].getLatLng().lng]"


def _wait_item(page: object, n: int, status: str) -> None:
    """Wait until the page has n images and the last one has this status."""
    page.wait_for_function(  # type: ignore[attr-defined]
        "([n, status]) => geoloc.state.items.length === n "
        "&& geoloc.state.items[n - 1].status === status",
        arg=[n, status],
    )


def _error_text(page: object) -> str:
    page.wait_for_selector("#error:not([hidden]) .problem-text")  # type: ignore[attr-defined]
    return str(page.inner_text("#error"))  # type: ignore[attr-defined]


# -- tests -----------------------------------------------------------------------------------


def test_locate_a_tile_shows_candidates_region_chart_and_timings(server, open_page, tmp_path):
    p = open_page(server)
    page = p.page
    assert "satellite" in page.inner_text("#purpose").lower()  # the model says what it locates
    page.set_input_files("#file", str(_tile(tmp_path / "sahara.png", *SAHARA)))
    page.wait_for_selector("#results:not([hidden]) .candidate")

    top = page.evaluate("geoloc.markers.map(m => [m.getLatLng().lat, m.getLatLng().lng])")
    assert len(top) == 5  # default top_k
    err_km = haversine_km(*SAHARA, *top[0])
    assert err_km < 750, (top[0], err_km)
    assert page.locator("path.geoloc-candidate").count() == 5
    assert page.locator("path.geoloc-top").count() == 1
    radii = page.evaluate("geoloc.markers.map(m => m.getRadius())")
    assert radii == sorted(radii, reverse=True) and radii[0] > radii[-1]  # sized by probability

    hexes = page.locator("path.geoloc-region")
    assert hexes.count() >= 1  # the uncertainty region, one path per H3 cell
    fills = set(
        page.eval_on_selector_all(
            "path.geoloc-region", "ps => ps.map(p => p.getAttribute('fill-opacity'))"
        )
    )
    assert "0.75" in fills  # the cell with the most mass is shaded darkest

    bars = page.locator("#country-bars .bar-row")
    assert bars.count() >= 1
    assert "%" in bars.first.inner_text()
    items = page.locator("#candidates .candidate")
    assert items.count() == 5
    first = items.first.inner_text()
    assert "%" in first and "best" in first
    assert "km from #1" in items.nth(1).inner_text()  # distances between candidates
    timings = page.inner_text("#timings")
    for stage in ("encode", "retrieve", "refine", "verify", "diversify", "describe", "total"):
        assert stage in timings
    # The picture itself, from the browser's own copy (an object URL), in its result and queue.
    thumb = page.locator("#results img[src^='blob:']")
    assert thumb.is_visible() and "sahara.png" in thumb.get_attribute("alt")
    assert page.evaluate("document.getElementById('thumb').naturalWidth") == 64  # it loaded
    assert page.locator("#queue img[src^='blob:']").is_visible()

    _screenshot(page, tmp_path / "web-page.png", doc="web-result.png")
    assert p.off_loopback() == [], p.off_loopback()
    assert any(u.endswith("/web/lib/bluemarble.jpg") for u in p.requests)
    assert any(u.endswith("/web/lib/countries-50m.json") for u in p.requests)


PHONE = (390, 844)


def test_a_picture_the_model_cannot_locate_gets_a_banner_and_no_country_bars_on_a_phone(
    judged_server, open_page, tmp_path
):
    p = open_page(judged_server, viewport=PHONE)
    page = p.page
    assert page.is_visible("#purpose") and "satellite" in page.inner_text("#purpose").lower()
    for kind, img in negatives(("text", "flat"), 1, seed=77_001):
        img.save(tmp_path / f"{kind}.png")
    page.set_input_files("#file", str(tmp_path / "text.png"))
    page.wait_for_selector("#results:not([hidden]) .candidate")
    verdict = page.locator("#verdict")
    assert verdict.get_attribute("data-verdict") == "not_locatable"
    assert "Not locatable" in verdict.inner_text() and "abstains" in verdict.inner_text()
    # On screen after the upload, not clipped by a scroll box: the element drawn at the
    # banner's centre is the banner.
    verdict.scroll_into_view_if_needed()
    assert page.evaluate(
        """() => { const b = document.getElementById('verdict').getBoundingClientRect();
        const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
        return b.height > 0 && b.top >= 0 && b.bottom <= innerHeight
            && document.getElementById('verdict').contains(hit); }"""
    )
    assert "not locatable" in page.inner_text("#queue")
    assert page.locator("#country-bars .bar-row").count() == 0  # no confident country bars
    assert "cannot locate" in page.inner_text("#countries-note")
    assert page.locator("path.geoloc-region").count() == 0  # no region either
    items = page.locator("#candidates .candidate")
    assert items.count() >= 1 and items.count() == page.locator(".candidate.unreliable").count()
    assert "unreliable" in items.first.inner_text() and "%" not in items.first.inner_text()
    _screenshot(page, tmp_path / "phone-not-locatable.png")

    page.set_input_files("#file", str(_tile(tmp_path / "sahara.png", *SAHARA)))
    _wait_item(page, 2, "done")
    assert page.locator("#verdict").get_attribute("data-verdict") in ("located", "uncertain")
    assert page.locator("#country-bars .bar-row").count() >= 1
    assert not page.locator(".candidate.unreliable").count()
    assert p.off_loopback() == [], p.off_loopback()


LAPTOP = (1366, 768)


def test_drop_several_images_and_switch_between_them(server, open_page, tmp_path):
    p = open_page(server, viewport=LAPTOP)
    page = p.page
    files = [
        ("sahara.png", (tmp_path / "s.png", SAHARA)),
        ("australia.png", (tmp_path / "a.png", AUSTRALIA)),
    ]
    payload = []
    for name, (path, (lat, lon)) in files:
        payload.append({"name": name, "bytes": list(_tile(path, lat, lon).read_bytes())})
    page.evaluate(
        """files => {
            const dt = new DataTransfer();
            for (const f of files) {
                dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: 'image/png'}));
            }
            const drop = new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true});
            document.getElementById('drop').dispatchEvent(drop);
        }""",
        payload,
    )
    page.wait_for_function(
        "geoloc.state.items.length === 2 && geoloc.state.items.every(i => i.status === 'done')"
    )
    assert page.locator("#queue .queue-item").count() == 2
    page.locator("#queue .queue-item").nth(1).click()
    page.wait_for_selector("#results:not([hidden]) .candidate")
    lat, lon = page.evaluate(TOP_MARKER)
    assert haversine_km(*AUSTRALIA, lat, lon) < 750
    # The top guesses and their probabilities at a glance: on screen without any scrolling.
    assert page.evaluate("document.querySelector('.panel').scrollTop") == 0
    rows = page.locator("#candidates .candidate")
    for i in range(3):
        box = rows.nth(i).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= LAPTOP[1], (i, box)
        assert "%" in rows.nth(i).locator(".cand-prob").inner_text()
    assert p.off_loopback() == []


def test_known_location_by_click_shows_error_and_sends_feedback(server, open_page, tmp_path):
    p = open_page(server)
    page = p.page
    page.set_input_files("#file", str(_tile(tmp_path / "sahara.png", *SAHARA)))
    page.wait_for_selector("#results:not([hidden]) .candidate")
    # Click the map where the truth is.
    xy = page.evaluate(
        "ll => { const pt = geoloc.map.latLngToContainerPoint(ll); return [pt.x, pt.y]; }",
        list(SAHARA),
    )
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + xy[0], box["y"] + xy[1])
    page.wait_for_selector("#feedback:not([hidden])")
    shown_km = float(page.get_attribute("#truth-error", "data-km"))
    top = page.evaluate(TOP_MARKER)
    clicked = (float(page.input_value("#truth-lat")), float(page.input_value("#truth-lon")))
    assert haversine_km(*clicked, *SAHARA) < 100  # the click landed where aimed
    assert shown_km == pytest.approx(haversine_km(*top, *clicked), rel=1e-3, abs=0.5)
    assert "km away" in page.inner_text("#truth-error")

    page.click("#feedback")
    page.wait_for_selector("#feedback-status:has-text('feedback recorded')")
    pid = page.evaluate("geoloc.state.selected.result.prediction_id")
    stored = httpx.get(f"{server.url}/v1/predictions/{pid}").json()
    assert stored["id"] == pid
    stats = httpx.get(f"{server.url}/v1/stats").json()
    assert stats["with_feedback"] >= 1
    _screenshot(page, tmp_path / "web-feedback.png")


def test_exif_gps_is_used_only_after_consent(server, open_page, tmp_path):
    p = open_page(server)
    page = p.page
    sydney = (-33.9, 151.2)  # far from what the model sees: off the map fitted to the answer
    photo = _tile(tmp_path / "geotagged.jpg", *SAHARA, gps=sydney)
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("#exif-consent:not([hidden])")
    assert "33.90°S, 151.20°E" in page.inner_text("#exif-text")
    assert not page.evaluate("ll => geoloc.map.getBounds().contains(ll)", list(sydney))
    assert page.inner_text("#truth-error") == ""  # nothing used before the person agrees
    page.click("#exif-use")
    page.wait_for_selector("#feedback:not([hidden])")
    assert "EXIF" in page.inner_text("#truth-error")
    assert page.locator("#exif-consent").is_hidden()
    top = page.evaluate(TOP_MARKER)
    shown_km = float(page.get_attribute("#truth-error", "data-km"))
    assert shown_km == pytest.approx(haversine_km(*top, *sydney), rel=1e-3, abs=0.5)
    # The map refits: the known location and the best candidate are both in view.
    assert page.evaluate("ll => geoloc.map.getBounds().contains(ll)", list(sydney))
    assert page.evaluate("ll => geoloc.map.getBounds().contains(ll)", top)
    truth = page.locator("path.geoloc-truth").bounding_box()
    view = page.locator("#map").bounding_box()
    assert truth is not None and view is not None
    assert view["x"] <= truth["x"] and truth["x"] + truth["width"] <= view["x"] + view["width"]
    assert view["y"] <= truth["y"] and truth["y"] + truth["height"] <= view["y"] + view["height"]


def test_not_an_image_and_a_damaged_image_get_clear_messages(server, open_page, tmp_path):
    p = open_page(server)
    page = p.page
    text = tmp_path / "notes.png"  # the name lies; the service judges by content
    text.write_text("these are not pixels\n" * 20)
    page.set_input_files("#file", str(text))
    message = _error_text(page)
    assert "not an image the service can read" in message
    assert "unsupported-media-type, HTTP 415" in message
    assert page.locator("#results").is_hidden()

    good = _tile(tmp_path / "t.png", *SAHARA).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    page.set_input_files("#file", str(tmp_path / "cut.png"))
    _wait_item(page, 2, "failed")
    assert "damaged or truncated" in _error_text(page)
    _screenshot(page, tmp_path / "web-error.png", doc="web-error.png")
    assert "failed:" in page.locator("#queue .queue-item").nth(0).inner_text()
    assert p.off_loopback() == []


def test_every_api_error_from_a_locked_server(locked_server, open_page, tmp_path):
    """401, 403, a key that works, 413, 503 and 429 from a real server, as a person sees them."""
    engine = make_engine(locked_server.db_url)
    with make_sessionmaker(engine)() as session:
        locate_key, _ = create_api_key(session, "web", ["locate"])
        admin_key, _ = create_api_key(session, "admin-only", ["admin"])
    engine.dispose()
    p = open_page(locked_server)
    page = p.page
    tile = _tile(tmp_path / "t.png", *SAHARA)

    page.set_input_files("#file", str(tile))
    assert "needs an API key" in _error_text(page)
    assert page.evaluate("document.getElementById('key-box').open")  # the field is shown

    page.fill("#api-key", admin_key)
    page.set_input_files("#file", str(tile))
    _wait_item(page, 2, "failed")
    assert "lacks the 'locate' scope" in _error_text(page)

    page.fill("#api-key", locate_key)
    # Kept in this browser only: session storage unless remembered, then local storage.
    assert page.evaluate("sessionStorage.getItem('geoloc.apiKey')") == locate_key
    assert page.evaluate("localStorage.getItem('geoloc.apiKey')") is None
    page.check("#key-remember")
    assert page.evaluate("localStorage.getItem('geoloc.apiKey')") == locate_key

    page.set_input_files("#file", str(tile))  # the key passes; the index is missing: 503
    _wait_item(page, 3, "failed")
    message = _error_text(page)
    assert "not ready yet" in message and "Try again" in message
    assert page.locator("#error button:has-text('Try again')").count() == 1

    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > 100_000
    page.set_input_files("#file", str(big))
    _wait_item(page, 4, "failed")
    message = _error_text(page)
    assert "too large" in message and "request-too-large, HTTP 413" in message

    # The 2nd request this minute that reached the limiter (401, 403 and 413 come before it).
    page.set_input_files("#file", str(tile))
    _wait_item(page, 5, "failed")
    message = _error_text(page)
    assert "rate limit" in message and "Try again in" in message
    assert p.off_loopback() == []


def test_every_problem_type_of_the_api_has_its_own_message(server, open_page):
    """docs/API.md lists the problem types; the page explains each one in words."""
    page = open_page(server).page
    api_md = (Path(__file__).resolve().parents[3] / "docs" / "API.md").read_text()
    errors = api_md.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = [
        line.split("|")[1:3]
        for line in errors.splitlines()
        if line.startswith("| `") and line.split("|")[2].strip()[:3].isdigit()
    ]
    types = {cell[0].strip().strip("`"): int(cell[1].strip()[:3]) for cell in rows}
    assert {"overloaded", "rate-limited", "image-too-large", "unauthorized"} <= set(types)
    texts = page.evaluate(
        """types => Object.fromEntries(Object.entries(types).map(([t, status]) =>
            [t, geoloc.explain(status, {type: 'https://geoloc.dev/problems/' + t}, '7').text]))""",
        types,
    )
    generic = {"Unexpected answer", "The service refused the request."}
    for type_, status in types.items():
        assert texts[type_] and not texts[type_].startswith("Unexpected"), (type_, texts[type_])
        if status in (413, 415, 429, 503, 504, 401, 403):
            assert texts[type_] not in generic, (type_, texts[type_])
    assert "busy" in texts["overloaded"] and "7 s" in texts["overloaded"]
    assert "took too long" in texts["timeout"]


def test_keyboard_reaches_the_upload_control_and_opens_the_file_chooser(server, open_page):
    p = open_page(server)
    page = p.page
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "choose":
            break
    else:
        pytest.fail("Tab never reached the upload button")
    for key in ("Enter", "Space"):
        before = len(p.file_choosers)
        page.keyboard.press(key)
        for _ in range(50):
            if len(p.file_choosers) > before:
                break
            page.wait_for_timeout(100)
        assert len(p.file_choosers) == before + 1, f"{key} did not open the file chooser"
        assert p.file_choosers[-1].is_multiple()  # type: ignore[attr-defined]
    assert page.get_attribute("#choose", "type") == "button"  # a real control, named by text
    assert page.inner_text("#choose").strip() == "Choose images…"


# Elements between `sel` and the document that scroll on their own (a box inside the page).
SCROLL_BOXES = """sel => { const out = [];
    for (let e = document.querySelector(sel).parentElement; e && e !== document.documentElement;
         e = e.parentElement) {
        const s = getComputedStyle(e);
        if (['auto', 'scroll'].includes(s.overflowY) && e.scrollHeight > e.clientHeight)
            out.push(`${e.tagName}#${e.id}.${e.className} ${e.clientHeight}/${e.scrollHeight}`);
    }
    return out; }"""

# Whether the element's centre is on screen and drawn by the element itself (not covered).
ON_SCREEN = """sel => { const e = document.querySelector(sel); const b = e.getBoundingClientRect();
    const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
    return b.height > 0 && b.top >= 0 && b.bottom <= innerHeight && e.contains(hit); }"""


def test_on_a_phone_the_results_are_in_the_page_flow(judged_server, open_page, tmp_path):
    p = open_page(judged_server, viewport=PHONE)
    page = p.page
    assert page.evaluate(ON_SCREEN, "#purpose")  # what this model locates, on screen at once
    assert "satellite" in page.inner_text("#purpose").lower()
    page.set_input_files("#file", str(_tile(tmp_path / "sahara.png", *SAHARA)))
    page.wait_for_selector("#results:not([hidden]) .candidate")

    # No box scrolling inside the page: the page itself scrolls to the candidates.
    assert page.evaluate(SCROLL_BOXES, "#candidates .candidate") == []
    first = page.locator("#candidates .candidate").first
    first.scroll_into_view_if_needed()
    assert page.evaluate(ON_SCREEN, "#candidates .candidate")
    assert page.evaluate(ON_SCREEN, "#verdict") and page.is_visible("#verdict")
    assert page.locator("#verdict").get_attribute("data-verdict") in ("located", "uncertain")
    assert page.is_visible("#purpose") and page.is_visible("#results img[src^='blob:']")
    # The first candidate row is above the fold after the upload, before any scrolling.
    page.evaluate("window.scrollTo(0, 0)")
    assert page.evaluate(ON_SCREEN, "#candidates .candidate")
    # The map follows the candidates, a real size, inside the page flow.
    map_box = page.locator("#map").bounding_box()
    cand_box = page.locator("#candidates").bounding_box()
    assert map_box is not None and cand_box is not None
    assert map_box["y"] >= cand_box["y"] + cand_box["height"] and map_box["height"] >= 300
    _screenshot(page, tmp_path / "phone.png", doc="web-phone.png")
    assert _axe(page) == []
    assert p.off_loopback() == []


# The map's view lies inside the one world: no band beyond ±180° nor above or below the poles
# (to a pixel: Leaflet rounds the view's pixel bounds).
WORLD_FILLS_MAP = """() => { const w = geoloc.map.getPixelWorldBounds();
    const v = geoloc.map.getPixelBounds();
    return v.min.x >= w.min.x - 1.5 && v.min.y >= w.min.y - 1.5
        && v.max.x <= w.max.x + 1.5 && v.max.y <= w.max.y + 1.5; }"""


@pytest.mark.parametrize("viewport", [(1400, 900), PHONE], ids=["desktop", "phone"])
def test_the_map_is_one_bounded_world_without_empty_bands(server, open_page, tmp_path, viewport):
    page = open_page(server, viewport=viewport).page
    page.wait_for_function("geoloc.basemap.isLoading && !geoloc.basemap.isLoading()")
    assert page.evaluate(WORLD_FILLS_MAP)
    if viewport != PHONE:
        _screenshot(page, tmp_path / "empty.png", doc="web-empty.png")
    assert page.evaluate("geoloc.basemap.options.noWrap")  # one world, no copies
    least = page.evaluate("geoloc.map.getMinZoom()")
    assert least > 0  # the least zoom is the one at which the world covers the map
    page.evaluate("geoloc.map.setZoom(0, {animate: false})")
    assert page.evaluate("geoloc.map.getZoom()") == least
    for dx, dy in ((5000, 0), (-10000, 0), (0, 5000), (0, -10000)):
        page.evaluate("d => geoloc.map.panBy(d, {animate: false})", [dx, dy])
        assert page.evaluate(WORLD_FILLS_MAP), (dx, dy)
    east = page.evaluate("geoloc.map.getBounds().getEast()")
    assert east <= 180 + 1e-6


def _map_pixels(page: object) -> np.ndarray:
    png = page.locator("#map").screenshot()  # type: ignore[attr-defined]
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_the_region_shows_at_world_zoom_and_markers_scale_with_zoom(
    judged_server, open_page, tmp_path
):
    """Candidates spread over continents (this index's uncertainty region covers several):
    the region stays visible at world zoom, and markers grow slower than distances do."""
    page = open_page(judged_server).page
    page.set_input_files("#file", str(_tile(tmp_path / "sahara.png", *SAHARA)))
    page.wait_for_selector("#results:not([hidden]) .candidate")
    cells = page.evaluate("geoloc.state.selected.result.region.cells.length")
    assert cells > 1
    # Stacked: base map and borders, then the region, the candidates, the known location.
    panes = ["tilePane", "overlayPane", "geolocRegion", "geolocCandidates", "geolocTruth"]
    z = page.evaluate("ps => ps.map(p => +getComputedStyle(geoloc.map.getPane(p)).zIndex)", panes)
    assert z == sorted(z) and len(set(z)) == len(z), z
    assert page.locator(".leaflet-geolocRegion-pane path.geoloc-region").count() == cells

    page.evaluate("geoloc.map.setZoom(geoloc.map.getMinZoom(), {animate: false})")
    page.wait_for_function("!geoloc.basemap.isLoading()")
    world = page.evaluate("geoloc.map.getZoom()")
    small = page.evaluate("geoloc.markers.map(m => m.getRadius())")
    assert max(small) <= 5  # markers leave the region visible at world zoom
    # The region as drawn changes what one sees at world zoom: every cell shows a few pixels.
    with_region = _map_pixels(page)
    page.evaluate("geoloc.map.removeLayer(geoloc.regionLayer)")
    without = _map_pixels(page)
    page.evaluate("geoloc.map.addLayer(geoloc.regionLayer)")
    changed = int((np.abs(with_region - without).sum(axis=2) > 60).sum())
    assert changed >= 10 * cells, (changed, cells)
    _screenshot(page, tmp_path / "world.png")

    # Zoomed in, markers grow, but slower than distances: the two nearest candidates separate.
    page.evaluate("geoloc.map.setView(geoloc.markers[0].getLatLng(), 7, {animate: false})")
    large = page.evaluate("geoloc.markers.map(m => m.getRadius())")
    assert all(a < b for a, b in zip(small, large, strict=True))
    assert large[0] / small[0] < 2 ** (7 - world) / 2
    pts = page.evaluate(
        "geoloc.markers.map(m => { const p = geoloc.map.latLngToContainerPoint(m.getLatLng());"
        " return [p.x, p.y]; })"
    )
    i, j = min(
        ((a, b) for a in range(len(pts)) for b in range(a + 1, len(pts))),
        key=lambda ab: np.hypot(*np.subtract(pts[ab[0]], pts[ab[1]])),
    )
    assert np.hypot(*np.subtract(pts[i], pts[j])) > large[i] + large[j], (pts, large)
    radii = page.evaluate("geoloc.markers.map(m => m.getRadius())")
    assert radii == sorted(radii, reverse=True)  # still sized by probability


def test_axe_finds_no_accessibility_violations(server, open_page, tmp_path):
    p = open_page(server)
    page = p.page
    assert _axe(page) == []  # the empty page
    page.set_input_files("#file", str(_tile(tmp_path / "sahara.png", *SAHARA)))
    page.wait_for_selector("#results:not([hidden]) .candidate")
    page.click("#map")  # a known location, so the feedback part is shown too
    page.wait_for_selector("#feedback:not([hidden])")
    assert _axe(page) == []
    (tmp_path / "notes.png").write_text("not an image")
    page.set_input_files("#file", str(tmp_path / "notes.png"))
    _error_text(page)
    assert _axe(page) == []
    # The checker is live: an input that loses its label is reported.
    page.evaluate("document.querySelector('label[for=top-k]').remove()")
    assert [v["id"] for v in _axe(page)] == ["label"]


# -- albums: several images of one place, located together ------------------------------------

#: Three views of Lake Chad's surroundings (a few tens of km apart) and one of Greenland.
SAHEL = [(13.0, 14.0), (13.2, 14.3), (12.8, 13.8)]
GREENLAND = (72.0, -40.0)

ALBUM_DONE = (
    "geoloc.state.selected && geoloc.state.selected.album "
    "&& geoloc.state.selected.status === 'done'"
)


def _views(tmp_path: Path, points: list[tuple[float, float]]) -> list[str]:
    return [str(_tile(tmp_path / f"view-{i}.png", *pt)) for i, pt in enumerate(points)]


def _album_calls(p: Page) -> list[str]:
    return [u for u in p.requests if urlsplit(u).path == "/v1/locate/album"]


def _album_rows(page: object) -> list[dict]:
    return page.eval_on_selector_all(  # type: ignore[attr-defined]
        "#album-images .album-image",
        """rows => rows.map(r => ({weight: +r.dataset.weight, text: r.innerText,
            outlier: r.classList.contains('outlier'),
            thumb: Boolean(r.querySelector('img[src^="blob:"]'))}))""",
    )


def test_album_same_place_sends_one_album_and_draws_the_joint_answer_and_each_image(
    server, open_page, tmp_path
):
    p = open_page(server, viewport=LAPTOP)
    page = p.page
    page.wait_for_function("geoloc.state.info !== null")
    page.fill("#top-k", "3")  # the page's options travel with the album as with one image
    page.set_input_files("#file", _views(tmp_path, SAHEL))
    page.wait_for_selector("#album-bar:not([hidden])")
    assert "Same place" in page.inner_text("#album-bar") and "3 images" in page.inner_text(
        "#album-bar"
    )
    # Off at first: each image is located on its own, as before.
    assert not page.is_checked("#same-place") and page.is_enabled("#same-place")
    page.wait_for_function(
        "geoloc.state.items.length === 3 && geoloc.state.items.every(i => i.status === 'done')"
    )
    assert _album_calls(p) == []

    with page.expect_request(lambda r: urlsplit(r.url).path == "/v1/locate/album") as sent:
        page.check("#same-place")
    request = sent.value
    assert request.method == "POST" and "top_k=3" in request.url
    page.wait_for_function(ALBUM_DONE)
    page.wait_for_selector("#album-section:not([hidden]) .album-image")
    result = page.evaluate("geoloc.state.selected.result")
    assert result["used"] == 3 and "combine" in result["stages"]
    # Every image, in order, in the multipart field `files` (the endpoint reads no other).
    names = [i["filename"] for i in result["images"]]
    assert names == ["view-0.png", "view-1.png", "view-2.png"]

    # The joint answer, drawn as a single answer is: candidates, markers, region, countries.
    assert page.locator("#candidates .candidate").count() == len(result["candidates"]) == 3
    assert page.locator("path.geoloc-candidate").count() == 3
    assert page.locator("path.geoloc-top").count() == 1
    assert haversine_km(*SAHEL[0], *page.evaluate(TOP_MARKER)) < 750
    assert page.locator("path.geoloc-region").count() >= 1
    assert page.locator("#country-bars .bar-row").count() >= 1
    assert "Album of 3 images" in page.inner_text("#result-name")
    assert "Same place: joint answer from 3 of 3 images" in page.inner_text("#result-meta")
    assert page.locator("#queue .queue-item.album").count() == 1

    # Each image's own best guess: a small numbered marker, in its own pane, near the place.
    pins = page.locator(".leaflet-geolocAlbum-pane .geoloc-album-image")
    assert pins.count() == 3
    assert [pins.nth(i).inner_text() for i in range(3)] == ["1", "2", "3"]
    own = page.evaluate("geoloc.albumMarkers.map(m => [m.getLatLng().lat, m.getLatLng().lng])")
    for i, (lat, lon) in enumerate(own):
        own_top = result["images"][i]["result"]["candidates"][0]
        assert (lat, lon) == pytest.approx((own_top["lat"], own_top["lon"]))
        assert haversine_km(*SAHEL[i], lat, lon) < 1000
    box = pins.first.bounding_box()
    assert box is not None and box["width"] <= 24  # small, unlike the candidates' circles

    # The list: thumbnail, weight as a percentage, no outlier among views of one place.
    rows = _album_rows(page)
    assert len(rows) == 3 and all(r["thumb"] for r in rows)
    assert sum(r["weight"] for r in rows) == pytest.approx(1.0, abs=1e-6)
    for row, image in zip(rows, result["images"], strict=True):
        assert f"{round(image['weight'] * 100)}%" in row["text"]
        assert "view-" in row["text"] and not row["outlier"] and "OUTLIER" not in row["text"]
    assert page.locator("#legend-album").is_visible()
    _screenshot(page, tmp_path / "album.png")

    # Off again: the images' own answers; on again: the album, not sent a second time.
    page.uncheck("#same-place")
    page.wait_for_selector("#album-section", state="hidden")
    assert page.evaluate("geoloc.state.selected.album") is None
    assert page.locator(".geoloc-album-image").count() == 0
    page.check("#same-place")
    page.wait_for_selector("#album-section:not([hidden]) .album-image")
    assert len(_album_calls(p)) == 1
    assert "spread_km" not in _album_calls(p)[0]  # the service's default spread

    # How far apart the images were taken: another choice sends the album again with it.
    assert page.is_enabled("#album-spread")
    with page.expect_request(lambda r: urlsplit(r.url).path == "/v1/locate/album") as sent:
        page.select_option("#album-spread", "0")
    assert "spread_km=0" in sent.value.url and "top_k=3" in sent.value.url
    page.wait_for_function(ALBUM_DONE)
    assert "(at one spot)" in page.inner_text("#result-name")
    assert page.locator("#queue .queue-item.album").count() == 2  # the first is kept
    assert "album" not in [
        c["source"] for c in page.evaluate("geoloc.state.selected.result")["candidates"]
    ]
    assert p.off_loopback() == []


def test_album_marks_the_picture_of_another_place_as_an_outlier_on_a_phone(
    judged_server, open_page, tmp_path
):
    p = open_page(judged_server, viewport=PHONE)
    page = p.page
    page.wait_for_function("geoloc.state.info !== null")
    notes = tmp_path / "notes.png"
    notes.write_text("these are not pixels\n" * 20)
    page.set_input_files("#file", [*_views(tmp_path, [*SAHEL, GREENLAND]), str(notes)])
    page.wait_for_selector("#album-bar:not([hidden])")
    assert page.evaluate(ON_SCREEN, "#same-place")  # the choice, on screen on a phone too
    page.check("#same-place")
    page.wait_for_function(ALBUM_DONE)
    page.wait_for_selector("#album-section:not([hidden]) .album-image")
    result = page.evaluate("geoloc.state.selected.result")
    assert result["used"] == 4

    rows = _album_rows(page)
    assert len(rows) == 5
    assert [r["outlier"] for r in rows] == [False, False, False, True, False]
    assert "outlier" in rows[3]["text"].lower() and rows[3]["weight"] < 0.1
    # The file that is no image: its problem, in its row; a warning above the answer.
    assert rows[4]["weight"] == 0 and "Could not be read" in rows[4]["text"]
    assert result["images"][4]["problem"]["detail"] in rows[4]["text"]
    assert "could not be used" in page.inner_text("#status .warn")

    pins = page.locator(".geoloc-album-image")
    assert pins.count() == 4  # the unreadable file has no guess of its own
    assert page.locator(".geoloc-album-image.outlier").count() == 1
    assert page.locator(".geoloc-album-image.outlier").inner_text() == "4"
    far = page.evaluate("geoloc.albumMarkers[3].getLatLng()")
    assert haversine_km(*GREENLAND, far["lat"], far["lng"]) < 1500
    assert haversine_km(*SAHEL[0], *page.evaluate(TOP_MARKER)) < 750  # not pulled north

    assert page.evaluate(SCROLL_BOXES, "#album-images .album-image") == []
    page.locator("#album-images .album-image").nth(3).scroll_into_view_if_needed()
    assert page.evaluate(ON_SCREEN, "#album-images .album-image.outlier")
    # The joint answer's localizability banner, as for one image.
    assert page.locator("#verdict").get_attribute("data-verdict") in ("located", "uncertain")
    page.locator("#verdict").scroll_into_view_if_needed()
    assert page.evaluate(ON_SCREEN, "#verdict")
    _screenshot(page, tmp_path / "phone-album.png")
    assert _axe(page) == []
    assert p.off_loopback() == []


def test_album_needs_two_images_and_at_most_max_album(server, open_page, tmp_path):
    p = open_page(server)
    page = p.page
    page.wait_for_function("geoloc.state.info !== null")
    assert page.evaluate("geoloc.state.info.limits.max_album") >= 2
    assert page.locator("#same-place").is_hidden()  # nothing to choose before any image
    page.set_input_files("#file", _views(tmp_path, SAHEL[:1]))
    _wait_item(page, 1, "done")
    assert page.locator("#album-bar").is_hidden()
    assert page.locator("#same-place").is_hidden() and page.is_disabled("#same-place")

    # More than the service allows (made 2 here): a message, nothing sent.
    page.evaluate("geoloc.state.info.limits.max_album = 2")
    page.set_input_files("#file", _views(tmp_path, SAHEL))
    page.wait_for_selector("#album-bar:not([hidden])")
    page.check("#same-place")
    page.wait_for_selector("#album-msg:not([hidden])")
    message = page.inner_text("#album-msg")
    assert "Too many images" in message and "2 to 2" in message and "Nothing was sent" in message
    _wait_item(page, 4, "done")  # the three were located one by one before the choice
    assert _album_calls(p) == []
    assert page.evaluate("geoloc.state.items.some(i => i.album)") is False

    # The choice stays for the next drop: two images go straight to the album endpoint.
    before = len([u for u in p.requests if urlsplit(u).path == "/v1/locate"])
    (tmp_path / "next").mkdir()
    page.set_input_files("#file", _views(tmp_path / "next", SAHEL[1:]))
    page.wait_for_function(ALBUM_DONE)
    assert page.is_checked("#same-place") and page.locator("#album-msg").is_hidden()
    assert len(_album_calls(p)) == 1
    assert len([u for u in p.requests if urlsplit(u).path == "/v1/locate"]) == before
    assert page.locator(".geoloc-album-image").count() == 2


def test_page_says_how_to_build_when_assets_are_missing(tmp_path, bm_index, bm_locator):
    settings = Settings(data_dir=bm_index.data_dir, web_assets_dir=tmp_path / "nothing")
    with TestClient(create_app(settings, locator=bm_locator)) as client:
        r = client.get("/")
        assert r.status_code == 503 and r.headers["content-type"].startswith("text/html")
        assert "make install" in r.text and "leaflet.js" in r.text
        assert client.get("/healthz").status_code == 200  # the API still serves
        assert client.get("/web/app.js").status_code == 200  # our own files are committed
        assert client.get("/web/lib/leaflet.js").status_code == 404
        assert "/" not in client.get("/openapi.json").json()["paths"]  # a page, not the API


def test_the_base_map_has_no_flat_rectangle_in_the_southern_ocean():
    """bmng.jpg paints part of the Southern Ocean one flat near-black blue; the page's base
    map paints it like the shaded ocean beside it."""
    from encoders.bluemarble import bmng_path
    from service.api.webpage import FLAT_SOUTHERN_OCEAN, clean_southern_ocean

    colour, north, tolerance = FLAT_SOUTHERN_OCEAN
    with Image.open(bmng_path()) as im:
        rgb = np.asarray(im.convert("RGB"))
    band = slice(int((90 - north) / 180 * len(rgb)), None)

    def flat_share(a: np.ndarray) -> float:
        return float((np.abs(a[band].astype(int) - colour).sum(axis=-1) <= tolerance).mean())

    assert flat_share(rgb) > 0.1
    cleaned = clean_southern_ocean(rgb)
    assert flat_share(cleaned) == 0.0
    assert (cleaned[: band.start] == rgb[: band.start]).all()  # nothing else changes
