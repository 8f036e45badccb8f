"""The Dockerfile builds, and the image it builds serves.

No container registry is reachable here, so the base images the Dockerfile names
(`python:3.11-slim`, `node:20-slim`) are made locally: `debootstrap` lays down Debian
bookworm (whose Python is 3.11), the node image adds this machine's Node.js 20, and buildah
commits them under those names. buildah (Debian's package, no daemon) then builds the Dockerfile
unchanged with `--pull=never`, and the image is run as its own user: migrate, build an index,
serve, `/readyz`, one locate, the image's health check.

The build downloads torch and every dependency (several GB) and takes many minutes, so it runs
only when asked: `make image-check` (root: it installs buildah and debootstrap, then sets
GEOLOC_TEST_IMAGE=1). Elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import tile_jpeg
from tests.net import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("GEOLOC_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# PyTorch's CPU wheel index is not reachable here: take torch from PyPI (its CUDA build, which
# runs on the CPU) through the Dockerfile's TORCH_INDEX_URL, as a mirror would be given.
TORCH_INDEX = os.environ.get("GEOLOC_TEST_TORCH_INDEX_URL", "https://pypi.org/simple")
IMAGE = "localhost/geoloc:image-check"


def _why_not() -> str | None:
    if os.environ.get("GEOLOC_TEST_IMAGE") != "1":
        return "downloads several GB and builds for minutes: run `make image-check`"
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install buildah debootstrap)"
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    return None


pytestmark = [
    pytest.mark.skipif(_why_not() is not None, reason=_why_not() or ""),
    pytest.mark.timeout(3600),
]


class Buildah:
    """buildah on a storage of its own (overlay), so nothing else's images are touched."""

    def __init__(self, root: Path) -> None:
        self.flags = [
            "--root", str(root / "storage"), "--runroot", str(root / "run"),
            "--storage-driver", "overlay",
        ]  # fmt: skip

    def __call__(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run(
            ["buildah", *self.flags, *args], capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, (
            f"buildah {args[0]}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
        return done.stdout.strip()


def _debootstrap(rootfs: Path, packages: list[str]) -> None:
    """Debian bookworm with ``packages``, and the host's trust store, so that a TLS-inspecting
    proxy the host trusts is trusted by the build's pip and npm too."""
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", "bookworm",
         str(rootfs), MIRROR],
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    log = rootfs / "debootstrap" / "debootstrap.log"
    details = log.read_text()[-3000:] if log.is_file() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + details
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")


def _commit(buildah: Buildah, rootfs: Path, name: str, env: list[str]) -> None:
    container = buildah("from", "scratch")
    buildah("copy", container, str(rootfs), "/")
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for value in (path, *env):
        buildah("config", "--env", value, container)
    buildah("commit", "--rm", "-q", container, name, timeout=1200)


def _node_into(rootfs: Path) -> None:
    """The host's Node.js 20 and its npm (Debian's own npm does not install with debootstrap:
    its hundreds of node-* packages fail to configure in its order)."""
    node = Path(shutil.which("node") or "/usr/bin/node").resolve()
    npm = node.parent.parent / "lib" / "node_modules" / "npm"
    assert npm.is_dir(), f"no npm beside {node}"
    shutil.copy2(node, rootfs / "usr/bin/node")
    shutil.copytree(npm, rootfs / "usr/lib/node_modules/npm", symlinks=True)
    (rootfs / "usr/bin/npm").symlink_to("../lib/node_modules/npm/bin/npm-cli.js")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Buildah, str]]:
    work = tmp_path_factory.mktemp("image")
    buildah = Buildah(work)
    try:
        rootfs = work / "rootfs"
        _debootstrap(rootfs, ["python3", "python3-venv", "python-is-python3", "ca-certificates"])
        _commit(buildah, rootfs, "docker.io/library/python:3.11-slim", [])
        _node_into(rootfs)
        extra_ca = "NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt"
        _commit(buildah, rootfs, "docker.io/library/node:20-slim", [extra_ca])
        shutil.rmtree(rootfs)
        started = time.monotonic()
        buildah(
            "bud", "--pull=never", "--isolation", "chroot", "--format", "docker", "--layers",
            "--build-arg", f"TORCH_INDEX_URL={TORCH_INDEX}", "-t", IMAGE, str(ROOT),
            timeout=3000,
        )  # fmt: skip
        print(f"image built in {time.monotonic() - started:.0f} s")
        yield buildah, IMAGE
    finally:
        subprocess.run(["buildah", *buildah.flags, "rm", "--all"], capture_output=True, timeout=300)
        # The overlay storage holds mounts: unmount before removing the folder.
        subprocess.run(["umount", "-R", str(work / "storage" / "overlay")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def test_image_configuration(image: tuple[Buildah, str]) -> None:
    buildah, name = image
    config = json.loads(buildah("inspect", "--type", "image", name))
    docker = config["Docker"]["config"]
    assert docker["User"] == "10001:10001"
    assert docker["Entrypoint"] == ["geoloc"] and docker["Cmd"] == ["serve"]
    assert "8000/tcp" in docker["ExposedPorts"]
    assert docker["Healthcheck"]["Test"] == ["CMD", "python", "/app/deploy/healthcheck.py"]
    assert "/data" in docker["Volumes"]


def test_image_serves_as_its_own_user(image: tuple[Buildah, str]) -> None:
    buildah, name = image
    container = buildah("from", "--pull-never", name)
    port = free_port()
    env = ["--env", f"GEOLOC_PORT={port}", "--env", "GEOLOC_HOST=127.0.0.1"]

    def run(*argv: str, timeout: float = 600) -> str:
        # chroot isolation shares the host's network, so the test reaches the port directly.
        return buildah(
            "run", "--isolation", "chroot", "--user", "10001:10001", *env, container, "--",
            *argv, timeout=timeout,
        )  # fmt: skip

    assert "bluemarble" in run("geoloc", "profiles")
    run("geoloc", "db", "upgrade")
    run("geoloc", "index", "build", "default-bluemarble", "--res", "1")
    server = subprocess.Popen(
        ["buildah", *buildah.flags, "run", "--isolation", "chroot", "--user", "10001:10001",
         *env, container, "--", "geoloc", "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/readyz", server, 300)
        answer = httpx.post(
            f"{base}/v1/locate", files={"file": ("t.jpg", tile_jpeg(), "image/jpeg")}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["candidates"] and answer.json()["prediction_id"]
        assert run("python", "/app/deploy/healthcheck.py") == ""  # exit 0: healthy
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the served process is buildah's child
        server.wait(timeout=60)
