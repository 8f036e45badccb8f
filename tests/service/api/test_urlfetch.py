"""POST /v1/locate/url: off by default, and never a way into private networks."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from api_helpers import assert_problem, tile_bytes

from service.api import urlfetch
from service.api.problems import UrlRefusedError
from service.api.urlfetch import address_refused, resolve_public

pytest_plugins = ["api_fixtures"]  # the bluemarble model, index and app fixtures

PUBLIC_NAME = "images.example.test"  # resolves (in these tests only) to the local server


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.255.255.254",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
    ],
)
def test_private_and_special_addresses_are_refused(address):
    assert address_refused(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888"])
def test_public_addresses_pass(address):
    assert address_refused(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "0x7f000001", "2130706433", "0177.0.0.1", "127.1", "localhost", "::1"]
)
def test_numeric_and_named_loopback_spellings_resolve_and_are_refused(host):
    with pytest.raises(UrlRefusedError):
        resolve_public(host, 80)


# -- a local web server, reached through a stand-in resolver ---------------------------------------


class _Handler(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str]]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        self.seen.append((self.path, self.headers.get("Host", "")))
        if self.path == "/tile.png":
            body = tile_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/to-loopback":
            self._redirect(f"http://127.0.0.1:{port}/tile.png")
        elif self.path == "/to-localhost":
            self._redirect(f"http://localhost:{port}/tile.png")
        elif self.path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path == "/relative":
            self._redirect("/tile.png")
        elif self.path.startswith("/loop"):
            n = int(self.path.removeprefix("/loop") or 0)
            self._redirect(f"http://{PUBLIC_NAME}:{port}/loop{n + 1}")
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: streamed until the limit
            for _ in range(64):
                self.wfile.write(b"\xff" * 16384)
        elif self.path == "/slow":
            time.sleep(2)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def server(monkeypatch) -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.seen = []
    real = urlfetch.resolve_public

    def fake_resolve(host: str, port: int):
        # Only this made-up public name skips the check (it stands for a public server);
        # every other name, redirect targets included, goes through the real one.
        if host == PUBLIC_NAME:
            return ipaddress.ip_address("127.0.0.1")
        return real(host, port)

    monkeypatch.setattr(urlfetch, "resolve_public", fake_resolve)
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _locate(client, url: str, **options):
    return client.post("/v1/locate/url", json={"url": url, "options": options or None})


def test_off_by_default(make_client):
    with make_client() as client:
        r = _locate(client, "https://example.com/a.jpg")
        assert_problem(r, 404, "url-fetch-disabled")


REFUSED_URLS = [
    "http://127.0.0.1/a.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:127.0.0.1]/a.jpg",
    "http://[::1]:8080/a.jpg",
    "http://0x7f000001/a.jpg",
    "http://2130706433/a.jpg",
    "http://0177.0.0.1/a.jpg",
    "http://localhost/a.jpg",
    "https://10.0.0.1/a.jpg",
    "ftp://example.com/a.jpg",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "http://user:secret@example.com/a.jpg",
    "http:///nohost",
    "not a url",
]


def test_refused_targets(make_client):
    with make_client(url_fetch_enabled=True) as client:
        for url in REFUSED_URLS:
            body = assert_problem(_locate(client, url), 400, "url-refused")
            assert body["instance"] == "/v1/locate/url"


def test_fetches_a_public_image_with_the_original_host_header(make_client, server):
    with make_client(url_fetch_enabled=True) as client:
        r = _locate(client, f"http://{PUBLIC_NAME}:{server}/tile.png", top_k=2)
        assert r.status_code == 200, r.text
        assert len(r.json()["candidates"]) == 2 and r.json()["prediction_id"]
        r = _locate(client, f"http://{PUBLIC_NAME}:{server}/relative")
        assert r.status_code == 200, r.text
    assert ("/tile.png", f"{PUBLIC_NAME}:{server}") in _Handler.seen


@pytest.mark.parametrize("path", ["/to-loopback", "/to-localhost", "/to-metadata"])
def test_a_redirect_to_a_private_address_is_refused(make_client, server, path):
    with make_client(url_fetch_enabled=True) as client:
        r = _locate(client, f"http://{PUBLIC_NAME}:{server}{path}")
        assert_problem(r, 400, "url-refused")
    assert [p for p, _ in _Handler.seen] == [path]  # the target was never requested


def test_redirects_are_bounded_and_errors_are_problems(make_client, server):
    base = f"http://{PUBLIC_NAME}:{server}"
    # A generous timeout here, so a loaded machine still reaches the redirect bound first.
    with make_client(
        url_fetch_enabled=True, url_fetch_timeout_s=30, max_image_bytes=100_000
    ) as client:
        body = assert_problem(_locate(client, f"{base}/loop"), 422, "url-fetch-failed")
        assert "redirects" in body["detail"]
        assert [p for p, _ in _Handler.seen] == ["/loop", "/loop1", "/loop2", "/loop3"]
        assert_problem(_locate(client, f"{base}/missing"), 422, "url-fetch-failed")
        assert_problem(_locate(client, f"{base}/big"), 413, "image-too-large")
        assert_problem(_locate(client, f"{base}/tile.png", top_k=0), 422, "invalid-request")
    with make_client(url_fetch_enabled=True, url_fetch_timeout_s=0.5) as client:
        body = assert_problem(_locate(client, f"{base}/slow"), 422, "url-fetch-failed")
        assert "longer than 0.5 s" in body["detail"]
        # A name that does not resolve (within the timeout, whatever the resolver does).
        r = _locate(client, "http://no-such-host.invalid/a.jpg")
        assert_problem(r, 422, "url-fetch-failed")
