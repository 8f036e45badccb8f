"""HTTP throughput and latency of `geoloc serve` (bundled model) on loopback.

Starts the real server (uvicorn, --workers processes) twice, with micro-batching on and off,
and drives it with N concurrent clients posting Blue Marble tiles to /v1/locate for a
fixed time per concurrency level. Bounded: every level runs --seconds, then stops.

    .venv/bin/python bench/service.py [--seconds 20] [--levels 1,4,16] [--workers 2]
        [--data DIR]

``--data``: serve a copy (hard links) of a data directory `geoloc setup` made, i.e. the
default set-up with its reference-image index and the calibration that carries the
localizability verdict (bench/shift.py's cache under bench/out/data-bluemarble-* is one),
instead of a bare H3 res-``--res`` gallery.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import io
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoders.bluemarble import render_tile  # noqa: E402

QUEUE_MAX = 64  # images the model queue admits; beyond it requests get 503 at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiles(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        lat, lon = float(rng.uniform(-50, 60)), float(rng.uniform(-180, 180))
        buf = io.BytesIO()
        render_tile(lat, lon, 1.8, 64).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def drive(
    url: str, images: list[bytes], concurrency: int, seconds: float
) -> tuple[int, int, list[float]]:
    ok = failed = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def worker(k: int) -> None:
            nonlocal ok, failed
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post(
                    url, files={"file": ("t.jpg", images[i % len(images)], "image/jpeg")}
                )
                lat.append(time.perf_counter() - t)
                if r.status_code == 200:
                    ok += 1
                else:
                    failed += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return ok, failed, lat


def serve(data_dir: Path, port: int, batching: bool, workers: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "GEOLOC_DATA_DIR": str(data_dir),
        "GEOLOC_PORT": str(port),
        "GEOLOC_BATCHING_ENABLED": str(batching).lower(),
        "GEOLOC_WORKERS": str(workers),
        "GEOLOC_QUEUE_MAX": str(QUEUE_MAX),
    }
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/geoloc"), "serve", "--log-level", "warning"], env=env, cwd=ROOT
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("server did not become ready")


def _copy_tree(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst`` as hard links where the file system allows (no space), else as
    copies (another file system: a tmpfs /tmp)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except (OSError, shutil.Error):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--res", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--data", type=Path, default=None, help="a data dir `geoloc setup` made")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    data = Path(tempfile.mkdtemp(prefix="geoloc-bench-svc-"))
    atexit.register(shutil.rmtree, data, True)  # the servers are stopped by then
    env = {**os.environ, "GEOLOC_DATA_DIR": str(data)}
    geoloc = str(ROOT / ".venv/bin/geoloc")
    if args.data is not None:
        if not (args.data / "indexes").is_dir():
            raise SystemExit(
                f"{args.data} has no indexes/ folder: not a data dir geoloc setup made"
            )
        for part in ("indexes", "calibrations"):
            if (args.data / part).is_dir():
                _copy_tree(args.data / part, data / part)
        # A fresh database: each index's newest version on disk is served.
        served = f"the set-up in {args.data} (gallery, reference images, calibration, verdict)"
    subprocess.run([geoloc, "db", "upgrade"], env=env, check=True, capture_output=True)
    if args.data is None:
        subprocess.run(
            [geoloc, "index", "build", "--res", str(args.res)],
            env=env,
            check=True,
            capture_output=True,
        )
        served = f"H3 res-{args.res} land gallery"
    images = tiles(64)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus; {args.workers} worker(s); "
        f"bundled bluemarble model, {served}, {args.seconds:.0f} s per level"
    )
    # A request admitted to the queue waits at most for the QUEUE_MAX images ahead of it:
    # QUEUE_MAX / throughput, plus its own service time.
    print(
        f"{'batching':<9} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'bound ms':>9} {'failed':>7}"
    )
    base: dict[bool, float] = {}
    for batching in (True, False):
        port = free_port()
        proc = serve(data, port, batching, args.workers)
        try:
            url = f"http://127.0.0.1:{port}/v1/locate"
            asyncio.run(drive(url, images, 2, 3))  # warm-up
            for c in levels:
                ok, failed, lat = asyncio.run(drive(url, images, c, args.seconds))
                rps = ok / args.seconds
                base.setdefault(batching, rps)
                q = statistics.quantiles([x * 1000 for x in lat], n=20)
                print(
                    f"{'on' if batching else 'off':<9} {c:>7} {rps:>7.1f} "
                    f"{statistics.median(lat) * 1000:>8.1f} {q[18]:>8.1f} "
                    f"{1000 * (QUEUE_MAX + 1) / rps:>9.0f} {failed:>7}  "
                    f"({rps / base[batching]:.2f}x of 1 client)"
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
