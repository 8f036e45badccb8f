"""What the LLM stages cost in latency, and what good or bad proposals do to accuracy.

The LLM is the scripted OpenAI-compatible test server (tests/service/llm_server.py) on
loopback, so the figures isolate the service's side: its latency is the artificial delay of
each answer. Requests go through the real app (in-process client), bundled bluemarble model,
held-out Blue Marble test tiles.

1. latency: median per request without the LLM and with it (default stages: 3 prompts x 2
   samples, then one reranking call), for several answer delays, as a ratio;
2. accuracy: top-1 error with no LLM, an "oracle" LLM whose answers fall within ~25 km of
   the truth, and a wrong one (the antipode), with H3 refinement on and off.

    .venv/bin/python bench/llm.py [--test 40] [--res 3] [--repeat 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# The project first (the service package, not bench/service.py), then the test server.
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "service")]

import tilesets  # noqa: E402  (the held-out test tiles and the output directory)
from fastapi.testclient import TestClient  # noqa: E402
from llm_server import Received, Reply, answer, chat_server  # noqa: E402

from encoders import load_model  # noqa: E402
from encoders.train import jitter_latlon  # noqa: E402
from index.geo import haversine_km  # noqa: E402
from index.geocode import ReverseGeocoder  # noqa: E402
from index.store import load_index  # noqa: E402
from service.api.main import create_app  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import upgrade  # noqa: E402
from service.engine.locator import Locator  # noqa: E402
from service.engine.scores import summarize_distances  # noqa: E402
from service.jobs.indexes import GallerySpec, build_index  # noqa: E402

OFF = {"llm_diversify": "false", "llm_rerank": "false"}


def post(client: TestClient, data: bytes, **params: Any) -> dict[str, Any]:
    r = client.post("/v1/locate", files={"file": ("t.png", data, "image/png")}, params=params)
    r.raise_for_status()
    return r.json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--res", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus")
    rows = tilesets.tileset("test", args.test, tilesets.TEST_SEED)
    tiles = [(r.lat, r.lon, Path(r.path).read_bytes()) for r in rows]

    data_dir = tilesets.OUT / f"llm-data-res{args.res}"
    settings = Settings(data_dir=data_dir)
    model = load_model("bluemarble")
    if not (data_dir / "indexes" / "default-bluemarble").is_dir():
        build_index(
            settings, "default-bluemarble", GallerySpec(kind="h3", res=args.res), model=model
        )
    locator = Locator(model, load_index(data_dir, "default-bluemarble"), ReverseGeocoder())
    gen = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {"truth": (0.0, 0.0), "mode": "oracle", "delay": 0.0}

    def script(req: Received) -> Reply:
        lat, lon = state["truth"]
        if req.is_rerank:
            return answer({"ranking": ["c1"]}, delay_s=state["delay"])
        if state["mode"] == "wrong":
            lat, lon = -lat, lon - 180 if lon > 0 else lon + 180
        else:  # within ~25 km: 15 km of noise per axis
            near = jitter_latlon(torch.tensor([[lat, lon]], dtype=torch.float64), 15.0, gen)
            lat, lon = (float(v) for v in near[0])
        return answer({"lat": lat, "lon": lon}, delay_s=state["delay"])

    with chat_server() as server, tempfile.TemporaryDirectory() as tmp:
        server.script = script
        db = f"sqlite:///{Path(tmp) / 'geoloc.db'}"
        upgrade(db)
        s = Settings(
            data_dir=data_dir,
            database_url=db,
            index_poll_s=0,
            llm_base_url=server.url,
            llm_model="scripted",
        )
        with TestClient(create_app(s, locator=locator)) as client:
            print(
                f"\nlatency per request, {args.repeat} requests each (LLM: "
                f"{len(s.llm_diversify_k)} prompts x {s.llm_samples} samples, "
                f"{s.llm_max_concurrency} at once, then 1 reranking call)"
            )
            print("| answer delay | no LLM, median ms | with LLM, median ms | added ms | ratio |")
            print("|---|---|---|---|---|")
            lat, lon, data = tiles[0]
            state["truth"] = (lat, lon)
            post(client, data)  # warm-up
            for delay in (0.0, 0.1, 0.5):
                state["delay"] = delay
                base, llm = [], []
                for _ in range(args.repeat):
                    for params, out in ((OFF, base), ({}, llm)):
                        t0 = time.perf_counter()
                        post(client, data, **params)
                        out.append((time.perf_counter() - t0) * 1000)
                b, m = statistics.median(base), statistics.median(llm)
                print(f"| {delay * 1000:.0f} ms | {b:.1f} | {m:.1f} | {m - b:.0f} | {m / b:.1f}x |")

            state["delay"] = 0.0
            print(f"\ntop-1 error on {len(tiles)} held-out test tiles, gallery H3 res {args.res}")
            print("| refine | LLM | median km | <25 km | <200 km | <750 km | top-1 from LLM |")
            print("|---|---|---|---|---|---|---|")
            for refine in ("true", "false"):
                for mode in ("none", "oracle", "wrong"):
                    state["mode"] = mode
                    errs, won = [], 0
                    for lat, lon, data in tiles:
                        state["truth"] = (lat, lon)
                        params = dict(OFF) if mode == "none" else {"llm_rerank": "false"}
                        body = post(client, data, refine=refine, **params)
                        c = body["candidates"][0]
                        errs.append(float(haversine_km(lat, lon, c["lat"], c["lon"])))
                        won += c["source"] == "llm"
                    sm = summarize_distances(np.array(errs))
                    acc = sm.within
                    print(
                        f"| {refine} | {mode} | {sm.median_km:.0f} | {acc[25]:.0%} | "
                        f"{acc[200]:.0%} | {acc[750]:.0%} | {won}/{len(tiles)} |"
                    )


if __name__ == "__main__":
    main()
