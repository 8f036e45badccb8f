"""The import rules of the layers (pyproject.toml's [tool.importlinter] contracts,
docs/ARCHITECTURE.md): they hold for the code, and each one fails when it is broken."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_code_keeps_every_import_contract() -> None:
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "broken" not in r.stdout.split("Contracts:")[-1].split("\n")[0].replace("0 broken", "")


#: A skeleton of the packages the contracts name, every module empty but these.
SKELETON = (
    "service/__init__.py",
    "service/config.py",
    "service/errors.py",
    "service/engine/__init__.py",
    "service/engine/options.py",
    "service/engine/locator.py",
    "service/engine/batching.py",
    "service/db/__init__.py",
    "service/db/session.py",
    "service/api/__init__.py",
    "service/api/main.py",
    "service/jobs/__init__.py",
    "service/jobs/setup.py",
    "service/cli/__init__.py",
    "service/cli/main.py",
    "encoders/__init__.py",
    "encoders/model.py",
    "encoders/registry.py",
    "index/__init__.py",
    "index/manifest.py",
    "index/search.py",
    "migrations/__init__.py",
)


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("index/search.py", "import service.engine.locator", "never import service"),
        ("service/engine/locator.py", "import sqlalchemy", "knows nothing of HTTP or SQL"),
        ("service/engine/batching.py", "import service.api.main", "above config"),
        ("service/db/session.py", "import faiss", "holds no model"),
        ("service/db/session.py", "import service.engine.locator", "above config"),
        ("service/config.py", "import torch", "start at once"),
        ("service/config.py", "import service.engine.locator", "above config"),
        ("service/engine/options.py", "import faiss", "start at once"),
        ("index/manifest.py", "import faiss", "start at once"),
        ("service/engine/batching.py", "import service.engine.locator", "circles"),
    ],
)
def test_each_contract_fails_when_broken(tmp_path: Path, module: str, line: str, contract: str):
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    for rel in SKELETON:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    (tmp_path / "service/config.py").write_text(
        "import service.engine.options\n"
    )  # downwards: fine
    (tmp_path / "service/engine/locator.py").write_text("import service.engine.batching\n")
    (tmp_path / "pyproject.toml").write_text(_toml(config))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    assert lint_imports(tmp_path, env).returncode == 0  # the skeleton itself keeps them
    target = tmp_path / module
    target.write_text(target.read_text() + line + "\n")
    r = lint_imports(tmp_path, env)
    assert r.returncode != 0
    broken = r.stdout.split("Broken contracts")[-1]
    assert contract in broken, r.stdout[-4000:]


def _toml(config: dict) -> str:
    """The [tool.importlinter] table back as TOML (strings, booleans and lists of strings)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["[tool.importlinter]"]
    lines += [f"{k} = {value(v)}" for k, v in config.items() if k != "contracts"]
    for contract in config["contracts"]:
        lines += ["", "[[tool.importlinter.contracts]]"]
        lines += [f"{k} = {value(v)}" for k, v in contract.items()]
    return "\n".join(lines) + "\n"
