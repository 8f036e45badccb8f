"""Download a file into the image at build time, checked against its sha256 (Dockerfile,
WEIGHTS=baked). Standard library only: the slim base has neither curl nor wget.

    python deploy/fetch_weights.py URL SHA256 DEST
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.request
from pathlib import Path


def fetch(url: str, sha256: str, dest: Path) -> None:
    if len(sha256) != 64:
        raise SystemExit("BACKBONE_SHA256 must be the file's 64-digit hex sha256")
    partial = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
        while block := response.read(1 << 20):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != sha256.lower():
        partial.unlink()
        raise SystemExit(f"{url}: sha256 {digest.hexdigest()}, expected {sha256}")
    os.replace(partial, dest)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    url, sha256, dest = argv
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    fetch(url, sha256, Path(dest))


if __name__ == "__main__":
    main(sys.argv[1:])
