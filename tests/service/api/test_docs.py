"""The API docs, /docs (Swagger UI) and /redoc (ReDoc), work without internet: their scripts,
styles and favicon come from the built static folder, and Debian's headless Chromium (driven by
Playwright, as in test_web.py) renders every operation while every request it makes is routed
and any that would leave loopback fails the test.

The browser tests need the built assets (`make install`) and /usr/bin/chromium
(`make system-deps`); without either they are skipped, saying why. The server is `geoloc serve`
as a real process with no index built: the docs need neither an index nor a locate.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import webpage
from service.api.main import create_app
from service.config import Settings
from tests.deploy.cluster import Replica, replica_env
from tests.net import free_port
from tests.service.api.browser import browser_missing, chromium

TIMEOUT_MS = 60_000
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DOC_PAGES = ("/docs", "/redoc")
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")


_skip_reason = browser_missing


# -- without a browser -------------------------------------------------------------------------


def _client(tmp_path: Path, assets: Path) -> TestClient:
    """The app without its lifespan: the docs pages need no model, index or database."""
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'geoloc.db'}",
        web_assets_dir=assets,
    )
    return TestClient(create_app(settings))


@pytest.mark.parametrize("path", DOC_PAGES)
def test_docs_pages_name_only_local_files(path, tmp_path):
    assets = Settings().web_assets_path
    if webpage.missing_assets(assets):
        pytest.skip("web assets not built: make install")
    client = _client(tmp_path, assets)
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert re.findall(r"https?://", r.text) == []  # no CDN, no web fonts
    for url in re.findall(r'(?:src|href)="([^"]+)"', r.text):
        assert url.startswith(webpage.ASSETS_URL + "/"), url
        assert client.get(url).status_code == 200, url
    assert "/openapi.json" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    # FastAPI's own CDN pages are off; the licences travel with the code.
    for name in ("LICENSE-swagger-ui.txt", "NOTICE-swagger-ui.txt", "LICENSE-redoc.txt"):
        assert client.get(f"{webpage.ASSETS_URL}/{name}").status_code == 200


def test_docs_pages_say_how_to_build_when_assets_are_missing(tmp_path):
    client = _client(tmp_path, tmp_path / "nothing")
    for path in DOC_PAGES:
        r = client.get(path)
        assert r.status_code == 503 and "make install" in r.text, path
        assert webpage.SWAGGER_JS in r.text and "/openapi.json" in r.text
    assert client.get("/openapi.json").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/docs", "/redoc"} & paths.keys()  # pages, not the API


# -- in a browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`geoloc serve` on a free loopback port, with an empty data dir (no index: not ready,
    but serving), its own SQLite database and the built static folder."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("docs")
    replica = Replica(
        "docs",
        free_port(),
        replica_env(
            tmp / "data",
            f"sqlite:///{tmp / 'geoloc.db'}",
            GEOLOC_INDEX_POLL_S="0",
            GEOLOC_WEB_ASSETS_DIR=str(Settings().web_assets_path),
        ),
        tmp / "serve.log",
    )
    replica.start()
    try:
        replica.wait_ready(300, path="/healthz")  # the model loads first: slow on busy cores
        yield replica.url
    finally:
        replica.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with chromium() as b:
        yield b


class Offline:
    """A browser context whose every request is routed: loopback ones go on, any other is
    aborted and recorded (data: and blob: URLs never leave the page)."""

    def __init__(self, browser: object) -> None:
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 900})  # type: ignore[attr-defined]
        self.ctx.route("**/*", self._route)
        # What the pages' Content-Security-Policy kept the browser from fetching.
        self.ctx.add_init_script(
            "window.blocked = []; document.addEventListener('securitypolicyviolation',"
            " e => window.blocked.push([e.blockedURI, e.effectiveDirective]))"
        )

    def _route(self, route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        self.requests.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname in LOOPBACK:
            route.continue_()  # type: ignore[attr-defined]
        else:
            self.refused.append(url)
            route.abort()  # type: ignore[attr-defined]

    def open(self, url: str) -> object:
        page = self.ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        return page


@pytest.fixture
def offline(browser: object) -> Iterator[Offline]:
    o = Offline(browser)
    try:
        yield o
    finally:
        o.ctx.close()


def _operations(base: str) -> list[tuple[str, str]]:
    doc = httpx.get(base + "/openapi.json", timeout=30).json()
    return [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]


def _dom_text(page: object) -> str:
    """The rendered DOM's text, without the zero-width spaces Swagger UI puts in paths."""
    return str(page.evaluate("document.body.textContent")).replace("\u200b", "")  # type: ignore[attr-defined]


def test_swagger_ui_renders_every_operation_offline(server_url, offline, tmp_path):
    ops = _operations(server_url)
    page = offline.open(server_url + "/docs")
    page.wait_for_selector(".opblock-summary-path")
    rendered = page.eval_on_selector_all(
        ".opblock",
        "bs => bs.map(b => [b.querySelector('.opblock-summary-method').textContent,"
        " b.querySelector('.opblock-summary-path').getAttribute('data-path')])",
    )
    assert sorted(map(tuple, rendered)) == sorted(ops)
    text = _dom_text(page)
    assert "/v1/locate" in text and "Locate one image" in text
    # The response models are there, with their descriptions.
    page.wait_for_selector("section.models")
    assert "LocateResponse" in _dom_text(page)
    page.screenshot(path=str(tmp_path / "docs.png"))
    print(f"\nscreenshot: {tmp_path / 'docs.png'}")
    assert offline.refused == [], offline.refused
    assert page.evaluate("window.blocked") == []
    assert any(u.endswith(f"{webpage.ASSETS_URL}/{webpage.SWAGGER_JS}") for u in offline.requests)
    assert any(u.endswith(f"{webpage.ASSETS_URL}/{webpage.DOCS_FAVICON}") for u in offline.requests)


def test_redoc_renders_every_operation_offline(server_url, offline, tmp_path):
    ops = _operations(server_url)
    page = offline.open(server_url + "/redoc")
    # A locator, not wait_for_function: its polling evaluates strings, which the page's
    # Content-Security-Policy (no 'unsafe-eval') refuses.
    page.get_by_text("/v1/locate").first.wait_for(state="attached")
    text = _dom_text(page)
    for method, path in ops:
        assert path in text, (method, path)
    assert "Locate one image" in text
    page.screenshot(path=str(tmp_path / "redoc.png"))
    print(f"\nscreenshot: {tmp_path / 'redoc.png'}")
    assert offline.refused == [], offline.refused
    # ReDoc 2 shows Redocly's logo from its CDN whatever the options: the policy stops it
    # in the browser, and nothing else.
    blocked = page.evaluate("window.blocked")
    assert blocked in ([], [[REDOC_LOGO, "img-src"]]), blocked
    assert any(u.endswith(f"{webpage.ASSETS_URL}/{webpage.REDOC_JS}") for u in offline.requests)
