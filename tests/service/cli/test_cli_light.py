"""`geoloc` commands that need no model start without importing torch, open_clip or faiss.

Each command runs in a fresh interpreter (the CLI app called in-process, then the names in
``sys.modules`` printed as JSON), so what it imported is exactly what the command needed: a
top-level ``import torch`` (or of any module that imports it) in a CLI module fails
``--help`` and ``test_every_cli_module_imports_light``. What is checked is imports, not time.
Bad arguments to the heavy commands (a missing image, a busy port) fail the same way: before
anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import pkgutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import service.cli

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("torch", "open_clip", "faiss")
MARK = "@@modules@@"


def probe(body: str) -> str:
    """Python that runs ``body``, then prints its exit code and the modules it imported."""
    return f"""
import json, sys
code = 0
try:
{textwrap.indent(body, "    ")}
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
sys.stdout.flush()
print({MARK!r} + json.dumps({{"exit": code, "modules": sorted(sys.modules)}}))
"""


#: The CLI run in-process on the arguments of the command line.
PROBE = probe('from service.cli.main import app\napp(sys.argv[1:], prog_name="geoloc")')


class Run:
    def __init__(self, done: subprocess.CompletedProcess[str]) -> None:
        out, _, tail = done.stdout.rpartition(MARK)
        assert tail, f"the CLI did not return:\n{done.stdout}\n{done.stderr}"
        result = json.loads(tail)
        self.exit: int = result["exit"]
        self.output = out + done.stderr
        self.heavy = sorted({m.partition(".")[0] for m in result["modules"]} & set(HEAVY))


def run_cli(env: dict[str, str], *args: str, code: str = PROBE) -> Run:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Run(done)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A fresh data directory and its SQLite database; no other GEOLOC_ setting."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    return base | {"GEOLOC_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "100"}


def light(env: dict[str, str], *args: str, exit: int = 0) -> Run:
    r = run_cli(env, *args)
    assert r.exit == exit, r.output
    assert "Traceback" not in r.output, r.output
    assert r.heavy == [], f"geoloc {' '.join(args)} imported {r.heavy}"
    return r


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["index", "--help"],
        ["db", "--help"],
        ["apikey", "--help"],
        ["locate", "--help"],
        ["serve", "--help"],
    ],
)
def test_help_is_light(env: dict[str, str], args: list[str]) -> None:
    assert "Usage: geoloc" in light(env, *args).output


def test_profiles_is_light(env: dict[str, str]) -> None:
    r = light(env, "profiles")
    assert "bluemarble" in r.output and "locates:" in r.output


def test_index_list_is_light(env: dict[str, str], tmp_path: Path, publish_tiny_index: Any) -> None:
    assert "no indexes yet" in light(env, "index", "list").output
    publish_tiny_index(tmp_path / "data", "tiny", "v1")
    assert "tiny/v1  bluemarble  csv" in light(env, "index", "list").output
    listed = light(env, "index", "list", "--json").output
    assert json.loads(listed)[0]["version"] == "v1"


def test_db_commands_are_light(env: dict[str, str]) -> None:
    assert "empty (head " in light(env, "db", "current").output
    assert light(env, "db", "current", "--check", exit=1).exit == 1
    assert "upgraded empty -> " in light(env, "db", "upgrade").output
    assert "already at " in light(env, "db", "upgrade", "--wait").output
    assert "at head)" in light(env, "db", "current", "--check").output
    assert "now at base" in light(env, "db", "downgrade", "base").output


def test_apikey_commands_are_light(env: dict[str, str]) -> None:
    assert "[schema-not-at-head]" in light(env, "apikey", "list", exit=2).output
    light(env, "db", "upgrade")
    assert "no API keys yet" in light(env, "apikey", "list").output
    created = light(env, "apikey", "create", "ci", "--scope", "admin")
    assert "created key 1 'ci'" in created.output
    assert "ci" in light(env, "apikey", "list").output
    assert json.loads(light(env, "apikey", "list", "--json").output)[0]["scopes"] == ["admin"]
    assert "revoked key 1 'ci'" in light(env, "apikey", "revoke", "1").output


def test_every_cli_module_imports_light(env: dict[str, str]) -> None:
    """Also the modules of commands that do load a model: their heavy imports are deferred."""
    names = [
        f"service.cli.{m.name}"
        for m in pkgutil.iter_modules(service.cli.__path__)
        if m.name != "__main__"
    ]
    assert "service.cli.locate" in names and "service.cli.serve" in names
    r = run_cli(env, code=probe("\n".join(f"import {n}" for n in names)))
    assert r.exit == 0, r.output
    assert r.heavy == [], r.heavy


def test_locate_checks_the_files_before_loading_anything(env: dict[str, str], tmp_path: Path):
    missing = tmp_path / "missing.jpg"
    r = light(env, "locate", str(missing), exit=2)
    assert f"error: [file-not-found] {missing}: no such file" in r.output
    r = light(env, "locate", str(tmp_path), exit=2)
    assert f"{tmp_path} is a directory, not an image file" in r.output
    r = light(env, "locate", exit=2)
    assert "Usage: geoloc locate [OPTIONS]" in r.output
    assert (
        "nothing to locate: give image files (JPEG, PNG, WebP), e.g. photos/*.jpg, or --text"
        in (r.output)
    )
    r = light(env, "locate", str(missing), "--bbox", "1,2", exit=2)
    assert "bbox must be" in r.output
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("RGB", (500, 1)).save(strip)
    r = light(env, "locate", str(strip), exit=2)
    assert f"[unsupported-image-shape] {strip} is 500x1" in r.output
    assert "GEOLOC_MAX_IMAGE_ASPECT" in r.output


def test_serve_on_a_busy_port_fails_before_loading_anything(env: dict[str, str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = light(env, "serve", "--host", "127.0.0.1", "--port", str(port), "--migrate", exit=2)
    assert f"error: cannot listen on 127.0.0.1:{port}: the port is already in use" in r.output
    assert not (Path(env["GEOLOC_DATA_DIR"]) / "geoloc.db").exists()  # nor migrated first
