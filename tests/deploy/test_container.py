"""The container files: hadolint on the Dockerfile, and the Dockerfile, docker-compose.yml and
nginx.conf agreeing with the code (commands that exist, settings that exist, one body limit).
No Docker engine is needed: the deployment itself is exercised in test_deploy.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from service.cli.main import app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _json_list(instruction: str) -> list[str]:
    m = re.search(rf"^{instruction} (\[.*\])$", DOCKERFILE, re.MULTILINE)
    assert m, f"no exec-form {instruction}"
    return [part.strip().strip('"') for part in m.group(1).strip("[]").split(",")]


def test_dockerfile_runs_existing_commands() -> None:
    command = _json_list("ENTRYPOINT") + _json_list("CMD")
    assert command[0] == "geoloc"
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "--migrate" in result.output
    health = re.search(r'CMD \["python", "/app/(deploy/healthcheck\.py)"\]', DOCKERFILE)
    assert health and (ROOT / health.group(1)).is_file()
    assert re.search(r"^USER 10001", DOCKERFILE, re.MULTILINE)  # not root


def _geoloc_names(env: dict[str, str]) -> set[str]:
    return {k.removeprefix("GEOLOC_").lower() for k in env if k.startswith("GEOLOC_")}


def test_environment_names_are_settings() -> None:
    fields = set(Settings.model_fields)
    docker_env = set(re.findall(r"\b(GEOLOC_[A-Z0-9_]+)=", DOCKERFILE))
    assert _geoloc_names(dict.fromkeys(docker_env)) <= fields
    replica_env = COMPOSE["services"]["geoloc"]["environment"]
    assert _geoloc_names(replica_env) <= fields, _geoloc_names(replica_env) - fields


def test_one_body_limit_for_nginx_and_replicas() -> None:
    replica = COMPOSE["services"]["geoloc"]["environment"]["GEOLOC_MAX_REQUEST_BYTES"]
    nginx = COMPOSE["services"]["nginx"]["environment"]["GEOLOC_MAX_REQUEST_BYTES"]
    assert replica == nginx == f"${{GEOLOC_MAX_REQUEST_BYTES:-{Settings().max_request_bytes}}}"
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "client_max_body_size ${GEOLOC_MAX_REQUEST_BYTES};" in conf
    mounts = COMPOSE["services"]["nginx"]["volumes"]
    assert "./nginx.conf:/etc/nginx/templates/default.conf.template:ro" in mounts


def test_baked_weights_are_checked_against_their_sha256(tmp_path: Path) -> None:
    """WEIGHTS=baked: deploy/fetch_weights.py keeps the download only when its sha256 is the
    one given (the build fails otherwise, leaving no file)."""
    import hashlib

    source = tmp_path / "backbone.pt"
    source.write_bytes(b"weights" * 1000)
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    script = str(ROOT / "deploy" / "fetch_weights.py")
    dest = tmp_path / "weights" / "backbone.pt"
    bad = subprocess.run(
        [sys.executable, script, source.as_uri(), "0" * 64, str(dest)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode != 0 and "expected" in bad.stderr and not dest.exists()
    assert not list(dest.parent.iterdir())
    ok = subprocess.run(
        [sys.executable, script, source.as_uri(), good, str(dest)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert dest.read_bytes() == source.read_bytes()
    assert re.search(r"fetch_weights\.py \"\$BACKBONE_URL\" \"\$BACKBONE_SHA256\"", DOCKERFILE)
