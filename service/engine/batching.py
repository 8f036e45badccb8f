"""Micro-batching: concurrent requests share one pass through the image tower.

Requests ``submit`` one decoded image each. A worker task takes the first waiting image, waits
at most ``max_wait_ms`` for up to ``max_size - 1`` more, runs the image tower once for all of
them (``Locator.embed``) in a worker thread, then the rest of the pipeline per image with that
request's own options (``Locator.locate_embeddings``). Each request keeps the Locator it
started with, so an index swap never mixes versions within one answer.

The queue is bounded: a full queue answers 503 at once (``OverloadedError``, with Retry-After)
rather than letting latency grow without limit, and each image has a deadline (504).
With batching off the same queue runs batches of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from encoders.structure import PictureReading, picture_descriptors
from service.engine.album import AlbumResult
from service.engine.localizability import image_statistics_many
from service.engine.locator import LocateResult, Locator
from service.engine.options import AlbumConfig, LocateOptions
from service.errors import DeadlineExceededError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class _Item:
    locator: Locator
    image: Image.Image
    options: LocateOptions
    future: asyncio.Future[LocateResult]
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Album:
    """An album: its pictures pass the image tower together, as one batch of their own."""

    locator: Locator
    images: list[Image.Image]
    options: LocateOptions
    config: AlbumConfig
    future: asyncio.Future[AlbumResult]
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        *,
        max_size: int = 16,
        max_wait_ms: float = 5.0,
        queue_max: int = 64,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.max_size = max_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.queue_max = queue_max
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item | _Album] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = 0

    @property
    def depth(self) -> int:
        """Images waiting or being located."""
        return (self._queue.qsize() if self._queue is not None else 0) + self._running

    async def start(self) -> None:
        # One model thread: torch parallelises inside an op; two batches at once only contend.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geoloc-model")
        self._queue = asyncio.Queue(maxsize=self.queue_max)
        self._task = asyncio.create_task(self._worker(), name="geoloc-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(OverloadedError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._queue = self._task = self._executor = None

    async def submit(
        self, locator: Locator, image: Image.Image, options: LocateOptions, *, timeout_s: float
    ) -> LocateResult:
        if self._queue is None:
            raise OverloadedError("the service is not started or is shutting down")
        item = _Item(locator, image, options, asyncio.get_running_loop().create_future())
        return await self._wait(item, timeout_s)

    async def submit_album(
        self,
        locator: Locator,
        images: list[Image.Image],
        options: LocateOptions,
        config: AlbumConfig,
        *,
        timeout_s: float,
    ) -> AlbumResult:
        """An album's pictures, located jointly (``Locator.locate_album``) in the model thread,
        in turn with the micro-batches. It takes one place in the queue."""
        if self._queue is None:
            raise OverloadedError("the service is not started or is shutting down")
        future = asyncio.get_running_loop().create_future()
        return await self._wait(_Album(locator, images, options, config, future), timeout_s)

    async def _wait(self, item: _Item | _Album, timeout_s: float) -> Any:
        assert self._queue is not None
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise OverloadedError(
                f"{self.queue_max} images are already waiting for the model; retry shortly",
                headers={"Retry-After": "1"},
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), timeout_s)
        except TimeoutError:
            item.future.cancel()  # the worker skips it if it has not started yet
            raise DeadlineExceededError(
                f"the {'album' if isinstance(item, _Album) else 'image'} was not located within "
                f"{timeout_s:g} s (GEOLOC_REQUEST_TIMEOUT_S)"
            ) from None

    async def _worker(self) -> None:
        assert self._queue is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_size:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        batch.append(self._queue.get_nowait())
                    else:
                        batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except (TimeoutError, asyncio.QueueEmpty):
                    break
            batch = [item for item in batch if not item.future.done()]
            albums = [item for item in batch if isinstance(item, _Album)]
            singles = [item for item in batch if isinstance(item, _Item)]
            if singles:
                await self._run(loop, singles)
            for album in albums:  # each album is a batch of its own pictures
                await self._run(loop, [album])

    async def _run(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Item] | list[_Album]
    ) -> None:
        """One micro-batch of single images, or one album, in the model thread."""
        assert self._executor is not None
        size = len(batch[0].images) if isinstance(batch[0], _Album) else len(batch)
        self._running = size
        try:
            if self.on_batch is not None:
                self.on_batch(size)
            outcomes: list[Any] = await loop.run_in_executor(
                self._executor, _run_album if isinstance(batch[0], _Album) else _run_batch, batch
            )
        except Exception as exc:  # the whole batch failed (e.g. the image tower)
            log.exception("micro-batch of %d images failed", size)
            outcomes = [exc] * len(batch)
        finally:
            self._running = 0
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, BaseException):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)


def _run_album(batch: list[_Album]) -> list[AlbumResult | BaseException]:
    (album,) = batch
    start = time.perf_counter()
    try:
        result = album.locator.locate_album(album.images, album.options, album.config)
    except Exception as exc:
        return [exc]
    queue_ms = round((start - album.queued_at) * 1000, 3)
    for r in (result.joint, *result.images):
        r.timings_ms = {"queue": queue_ms, **r.timings_ms}
    return [result]


def _run_batch(batch: list[_Item]) -> list[LocateResult | BaseException]:
    """Image tower once per model, then the pipeline per image with its own options.

    The localizability statistics of the pictures are computed per Locator (a swap may bring
    a verdict, or take it away), for that Locator's images at once."""
    batch_start = time.perf_counter()
    outcomes: list[LocateResult | BaseException] = []
    groups: dict[int, list[int]] = {}
    for i, item in enumerate(batch):
        groups.setdefault(id(item.locator.model), []).append(i)
    embedded: dict[int, tuple[np.ndarray, float]] = {}
    stats: dict[int, tuple[np.ndarray | None, float]] = {}
    read: dict[
        int, tuple[np.ndarray | None, np.ndarray | None, list[Image.Image | None], float]
    ] = {}
    for members in groups.values():
        images = [batch[i].image for i in members]
        t0 = time.perf_counter()
        queries = batch[members[0]].locator.embed(images)
        t1 = time.perf_counter()
        # The statistics depend on the pictures only; None where no locator has a verdict.
        judged = [i for i in members if batch[i].locator.judge is not None]
        rows = image_statistics_many(images) if judged else None
        stats_ms = (time.perf_counter() - t1) * 1000 / len(members)
        for row, i in enumerate(members):
            embedded[i] = (queries[row : row + 1], (t1 - t0) * 1000 / len(members))
            own = rows is not None and batch[i].locator.judge is not None
            stats[i] = (rows[row : row + 1] if own else None, stats_ms)
        t2 = time.perf_counter()
        # Read once for the group; each item's locator orients its own (as Locator.locate).
        reading = picture_descriptors(images)
        mine = {}
        for row, i in enumerate(members):
            item = batch[i]
            one = PictureReading(*(part[row : row + 1] for part in reading))
            desc, thumb, view = item.locator.read([item.image], one)
            # The colours go as read: the pipeline compares them only where asked to.
            mine[i] = (desc if item.locator.needs_structure(item.options) else None, thumb, view)
        read_ms = (time.perf_counter() - t2) * 1000 / len(members)
        read.update({i: (*got, read_ms) for i, got in mine.items()})
    for i, item in enumerate(batch):
        query, encode_ms = embedded[i]
        image_stats, stats_ms = stats[i]
        descriptor, thumb, views, structure_ms = read[i]
        try:
            result = item.locator.locate_embeddings(
                query,
                item.options,
                image_stats=image_stats,
                structure=descriptor,
                views=views,
                colour=thumb,
            )[0]
        except Exception as exc:
            outcomes.append(exc)
            continue
        if result.localizability is not None:
            result.add_time("judge", stats_ms)
        result.add_time("retrieve", structure_ms)
        queue_ms = (batch_start - item.queued_at) * 1000
        result.timings_ms = {
            "queue": round(queue_ms, 3),
            "encode": round(encode_ms, 3),
            **result.timings_ms,
        }
        outcomes.append(result)
    return outcomes
