"""Micro-batching: shared image-tower passes, per-request options, capacity and deadlines."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from api_helpers import assert_problem, tile_bytes
from PIL import Image

from encoders.bluemarble import render_tile
from service.engine.batching import MicroBatcher
from service.engine.locator import Locator
from service.engine.options import LocateOptions
from service.errors import OverloadedError

pytest_plugins = ["api_fixtures"]  # the bluemarble model, index and app fixtures

PLACES = [(23.0, 12.0), (29.5, 84.0), (-4.0, -63.0), (72.0, -40.0), (30.8, 31.0), (-25.0, 133.0)]


class SpyLocator(Locator):
    """The same model and index; records image-tower batch sizes and can be slowed down."""

    def __init__(self, base: Locator, delay_s: float = 0.0) -> None:
        super().__init__(base.model, base.index, base.geocoder, neighbours=base.neighbours)
        self.delay_s = delay_s
        self.embed_sizes: list[int] = []

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.embed_sizes.append(len(images))
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().embed(images)


def test_concurrent_images_share_one_pass_and_keep_their_own_options(bm_locator):
    spy = SpyLocator(bm_locator)
    tiles = [render_tile(lat, lon, 2.0, 64) for lat, lon in PLACES]
    options = [LocateOptions(top_k=k, refine=k % 2 == 0) for k in range(1, len(tiles) + 1)]
    sizes: list[int] = []

    async def main() -> list:
        batcher = MicroBatcher(max_size=16, max_wait_ms=200, queue_max=16, on_batch=sizes.append)
        await batcher.start()
        try:
            return await asyncio.gather(
                *(
                    batcher.submit(spy, t, o, timeout_s=30)
                    for t, o in zip(tiles, options, strict=True)
                )
            )
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert sizes == [len(tiles)] and spy.embed_sizes == [len(tiles)]
    for tile, opt, res in zip(tiles, options, results, strict=True):
        alone = bm_locator.locate([tile], opt)[0]
        assert len(res.candidates) == opt.top_k
        assert ("refine" in res.stages) == opt.refine
        assert res.index == bm_locator.index_label
        assert {"queue", "encode"} <= set(res.timings_ms)
        for a, b in zip(res.candidates, alone.candidates, strict=True):
            assert (a.lat, a.lon) == pytest.approx((b.lat, b.lon), abs=1e-3)
            assert a.probability == pytest.approx(b.probability, abs=1e-4)


def test_a_full_queue_refuses_at_once(bm_locator):
    spy = SpyLocator(bm_locator, delay_s=0.3)
    tile = render_tile(0.0, 20.0, 2.0, 64)

    async def main() -> list:
        batcher = MicroBatcher(max_size=1, max_wait_ms=0, queue_max=2)
        await batcher.start()
        try:
            first = asyncio.create_task(batcher.submit(spy, tile, LocateOptions(), timeout_s=10))
            await asyncio.sleep(0.05)  # the worker has taken it: the queue is empty again
            rest = [
                asyncio.create_task(batcher.submit(spy, tile, LocateOptions(), timeout_s=10))
                for _ in range(4)
            ]
            return await asyncio.gather(first, *rest, return_exceptions=True)
        finally:
            await batcher.stop()

    outcomes = asyncio.run(main())
    refused = [o for o in outcomes if isinstance(o, OverloadedError)]
    assert len(refused) == 2 and refused[0].headers["Retry-After"] == "1"
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 3


def _post_concurrently(client, n: int, **params) -> list:
    png = tile_bytes()
    with ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(
                client.post,
                "/v1/locate",
                files={"file": ("t.png", png, "image/png")},
                params=params,
            )
            for _ in range(n)
        ]
        return [f.result() for f in futures]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


@pytest.mark.timeout(120)
def test_over_capacity_answers_503_with_retry_after(make_client, bm_locator):
    slow = SpyLocator(bm_locator, delay_s=0.4)
    with make_client(locator=slow, queue_max=1, batch_max_size=1) as client:
        responses = _post_concurrently(client, 8)
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    for r in responses:
        if r.status_code == 503:
            assert_problem(r, 503, "overloaded")
            assert r.headers["retry-after"] == "1"


def test_deadline_answers_504(make_client, bm_locator):
    slow = SpyLocator(bm_locator, delay_s=1.0)
    with make_client(locator=slow, request_timeout_s=0.2) as client:
        r = client.post("/v1/locate", files={"file": ("t.png", tile_bytes(), "image/png")})
        assert_problem(r, 504, "timeout")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("enabled", [True, False])
def test_batching_on_and_off_through_the_app(make_client, bm_locator, enabled):
    spy = SpyLocator(bm_locator, delay_s=0.2)  # while one batch runs, the others queue up
    with make_client(locator=spy, batching_enabled=enabled, batch_max_wait_ms=20) as client:
        responses = _post_concurrently(client, 6, top_k=2)
        metrics = client.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * 6
    assert all(len(r.json()["candidates"]) == 2 for r in responses)
    assert _metric(metrics, "geoloc_batch_size_sum") == 6
    if enabled:
        assert max(spy.embed_sizes) > 1 and _metric(metrics, "geoloc_batch_size_count") < 6
    else:
        assert spy.embed_sizes == [1] * 6


def test_pictures_in_false_colour_are_laid_out_as_alone(bm_locator, tmp_path):
    """A batch lays pictures drawn through a colour ramp out along it, turned the way their
    best reference match runs, and locates their grey views too, as a picture located alone
    is; true-colour pictures in the same batch have their colours compared: the same
    answers."""
    import matplotlib

    from encoders.structure import colour_thumbnails, picture_descriptors, structure_descriptors
    from index.store import PointTable, load_index, publish_index

    rng = np.random.default_rng(3)
    places = PLACES + [(rng.uniform(-50, 60), rng.uniform(-170, 170)) for _ in range(40)]
    refs = [render_tile(lat, lon, 2.0, 64) for lat, lon in places]
    latlon = np.array(places)
    points = PointTable(
        ids=np.arange(len(refs)),
        latlon=latlon,
        country=bm_locator.geocoder.country_codes(latlon),
        structure=structure_descriptors(refs),
        colour=colour_thumbnails(refs),
    )
    vectors = bm_locator.embed(refs).astype(np.float32)
    publish_index(
        tmp_path, "refs", vectors, points, profile="bluemarble", gallery_kind="images",
        h3_resolution=None,
    )  # fmt: skip
    loc = Locator(
        bm_locator.model,
        bm_locator.index,
        bm_locator.geocoder,
        neighbours=load_index(tmp_path, "refs"),
    )
    assert loc.compares_structure
    jet = matplotlib.colormaps["jet"]
    tiles = [
        Image.fromarray(
            np.round(jet(np.asarray(t.convert("L"), np.float32) / 255.0)[..., :3] * 255).astype(
                np.uint8
            )
        )
        for t in refs[: len(PLACES)]
    ]
    reading = picture_descriptors(tiles)
    assert reading.unsure.any()
    assert np.any(loc.structure(tiles) != reading.descriptors)  # some are turned round
    tiles += refs[: len(PLACES)]  # in true colour: their own references agree in colour
    options = LocateOptions(top_k=3, return_neighbours=True)

    async def main() -> list:
        batcher = MicroBatcher(max_size=16, max_wait_ms=200, queue_max=16)
        await batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit(loc, t, options, timeout_s=30) for t in tiles)
            )
        finally:
            await batcher.stop()

    batched = asyncio.run(main())
    assert any("grey_view" in r.stages for r in batched)  # answered from their grey views
    assert all(r.extra["neighbours"][0]["colour"] == 1.0 for r in batched[len(PLACES) :])
    for tile, res in zip(tiles, batched, strict=True):
        alone = loc.locate([tile], options)[0]
        assert res.stages == alone.stages
        for key in ("id", "colour"):  # no colour: answered from a grey view
            assert [n.get(key) for n in res.extra["neighbours"]] == [
                n.get(key) for n in alone.extra["neighbours"]
            ]
        for a, b in zip(res.candidates, alone.candidates, strict=True):
            assert (a.lat, a.lon) == pytest.approx((b.lat, b.lon), abs=1e-3)
