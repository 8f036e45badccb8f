"""index.manifest: what listing and inspecting indexes needs, without faiss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_listing_indexes_imports_no_faiss_or_torch() -> None:
    code = (
        "import sys, index.manifest; "
        "assert 'faiss' not in sys.modules and 'torch' not in sys.modules, "
        "sorted(m for m in sys.modules if m in ('faiss', 'torch'))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
