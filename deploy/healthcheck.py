"""Container health check: exit 0 when this replica's /healthz answers 200, else 1.

Plain standard library on purpose: it runs every few seconds, and importing geoloc (torch)
would cost seconds of CPU each time. Reads GEOLOC_PORT (default 8000).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('GEOLOC_PORT', '8000')}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
