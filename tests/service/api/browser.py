"""Debian's Chromium driven by Playwright: the one launcher of the browser tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from service.api import webpage
from service.config import Settings

CHROMIUM = "/usr/bin/chromium"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: make system-deps (Debian package chromium)"
    missing = webpage.missing_assets(Settings().web_assets_path)
    if missing:
        return f"web page assets not built ({missing[0]} ...): make install"
    return None


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (a playwright Browser), closed afterwards."""
    from playwright import sync_api  # a dev extra: the callers skip without it

    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield b
        finally:
            b.close()
