"""The README's quick start without `make`, run as written on a fresh data directory.

The block after the `quick-start` marker is read from README.md. Its first line makes the venv
and installs geoloc (what the test run already did); the others run here with this venv's
`geoloc`, smaller set-up sizes (the default takes minutes), a free port, and the curl of the
next block against the running service.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from encoders.bluemarble import render_tile
from tests.net import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SMALL = {
    "GEOLOC_DEFAULT_RES": "2",
    "GEOLOC_SETUP_REFERENCE_TILES": "300",
    "GEOLOC_SETUP_CALIBRATION_TILES": "200",
}


def _blocks_after_marker() -> list[list[str]]:
    tail = README.split("<!-- quick-start:", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", tail, re.DOTALL)[:2]
    return [[ln.split("#", 1)[0].strip() for ln in b.splitlines() if ln.strip()] for b in blocks]


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    (install, setup, serve), (curl,) = _blocks_after_marker()
    assert install == "python3 -m venv .venv && .venv/bin/pip install -e ."
    assert setup == ".venv/bin/geoloc setup" and serve == ".venv/bin/geoloc serve"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    env |= {**SMALL, "GEOLOC_DATA_DIR": str(tmp_path / "data"), "GEOLOC_PORT": str(port)}
    geoloc = str(Path(sys.executable).parent / "geoloc")

    def argv(line: str) -> list[str]:
        words = shlex.split(line)
        return [geoloc if w == ".venv/bin/geoloc" else w for w in words]

    done = subprocess.run(
        argv(setup), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    server = subprocess.Popen(
        argv(serve), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server, 120)
        render_tile(-25.0, 134.0, 14.0, 64).convert("RGB").save(tmp_path / "tile.jpg")
        words = argv(curl.replace(":8000", f":{port}"))
        answer = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        body = json.loads(answer.stdout)
        assert body["candidates"] and body["localizability"]["verdict"], body
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=5) as r:
            info = json.loads(r.read())
        assert info["reference_index"]["count"] == 300  # image neighbours are served
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
