"""Fetch an image by URL without letting callers reach private networks (SSRF protection).

The rules: http and https only, no credentials in the URL; the host is resolved once and the
request goes to that pinned address (the Host header and TLS SNI keep the original name, so
certificates are still checked against it); every resolved address must be public: loopback,
private, link-local, multicast, reserved, unspecified and shared (CGNAT) ranges are refused,
IPv4-mapped/6to4/NAT64 IPv6 forms by the IPv4 address they carry. Numeric spellings such as
``0x7f000001``, ``2130706433`` or ``0177.0.0.1`` are judged by what the resolver makes of
them, never by the string. Redirects are followed by hand, at most ``MAX_REDIRECTS``, each
target checked like the first. The body is streamed with a byte limit, and the whole fetch
(redirects included) has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from service.api.problems import UrlFetchError, UrlRefusedError
from service.errors import ImageTooLargeError

MAX_REDIRECTS = 3
REDIRECTS = frozenset({301, 302, 303, 307, 308})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_refused(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is not None:
            return address_refused(embedded)
    for what in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{what}"):
            return what.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (blocking: getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


def resolve_public(host: str, port: int) -> IPAddress:
    """Resolve once; refuse unless every address is public. Returns the address to pin."""
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        raise UrlFetchError(f"cannot resolve host {host!r} ({exc})") from None
    if not addresses:
        raise UrlFetchError(f"host {host!r} resolves to no address")
    for ip in addresses:
        why = address_refused(ip)
        if why is not None:
            raise UrlRefusedError(
                f"host {host!r} resolves to {ip} ({why}); only public addresses are fetched"
            )
    return addresses[0]


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        try:
            parts = urlsplit(url.strip())
            port = parts.port
        except ValueError as exc:
            raise UrlRefusedError(f"not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise UrlRefusedError(f"only http and https URLs are fetched, not {scheme or 'none'!r}")
        if parts.username is not None or parts.password is not None:
            raise UrlRefusedError("URLs with credentials (user:password@) are refused")
        host = parts.hostname or ""
        if not host:
            raise UrlRefusedError("the URL has no host")
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        default = 443 if scheme == "https" else 80
        return cls(url.strip(), scheme, host, port or default, path)

    @property
    def host_header(self) -> str:
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return name if self.port == default else f"{name}:{self.port}"

    def pinned(self, ip: IPAddress) -> httpx.URL:
        return httpx.URL(
            scheme=self.scheme, host=str(ip), port=self.port, raw_path=self.path.encode()
        )


async def fetch_image(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The body of ``url`` (at most ``max_bytes``), fetched under the rules above."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, max_bytes, timeout_s, transport)
    except TimeoutError:
        raise UrlFetchError(f"fetching the URL took longer than {timeout_s:g} s") from None


async def _fetch(
    url: str, max_bytes: int, timeout_s: float, transport: httpx.AsyncBaseTransport | None
) -> bytes:
    async with httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=timeout_s, transport=transport
    ) as client:
        for _hop in range(MAX_REDIRECTS + 1):
            target = Target.parse(url)
            # Looked up through the module so tests can stand a resolver in.
            ip = await anyio.to_thread.run_sync(resolve_public, target.host, target.port)
            headers = {
                "Host": target.host_header,
                "Accept": "image/jpeg, image/png, image/webp",
                "Accept-Encoding": "identity",
                "User-Agent": "geoloc-url-fetch",
            }
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            try:
                async with client.stream(
                    "GET", target.pinned(ip), headers=headers, extensions=extensions
                ) as resp:
                    if resp.status_code in REDIRECTS:
                        location = resp.headers.get("location")
                        if not location:
                            raise UrlFetchError(f"HTTP {resp.status_code} without a Location")
                        url = urljoin(target.url, location)
                        continue
                    if resp.status_code != 200:
                        raise UrlFetchError(f"the URL answered HTTP {resp.status_code}")
                    return await _read_limited(resp, max_bytes)
            except httpx.HTTPError as exc:
                raise UrlFetchError(f"cannot fetch the URL ({type(exc).__name__}: {exc})") from None
        raise UrlFetchError(f"more than {MAX_REDIRECTS} redirects")


async def _read_limited(resp: httpx.Response, max_bytes: int) -> bytes:
    announced = resp.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > max_bytes:
        raise ImageTooLargeError(
            f"the URL's body has {announced} bytes; the limit is {max_bytes} "
            "(GEOLOC_MAX_IMAGE_BYTES)"
        )
    body = bytearray()
    async for chunk in resp.aiter_raw():
        body += chunk
        if len(body) > max_bytes:
            raise ImageTooLargeError(
                f"the URL's body exceeds {max_bytes} bytes (GEOLOC_MAX_IMAGE_BYTES)"
            )
    return bytes(body)
