"""Prometheus metrics of one app (its own registry, so several apps in one process stay apart).

With several workers (GEOLOC_WORKERS > 1) the supervisor gives them one directory in
``PROMETHEUS_MULTIPROC_DIR`` before they start, prometheus_client keeps every value in a file
there, and a scrape of any worker reads all of them (``MultiProcessCollector``): one scrape
counts the requests of the whole replica. Gauges say how they add up across workers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if self.multiprocess_dir() is None:  # process_* of the one process (memory, CPU, fds)
            ProcessCollector(registry=r)
        self.requests = Counter(
            "geoloc_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "geoloc_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route"],
            registry=r,
        )
        self.stages = Histogram(
            "geoloc_stage_duration_seconds",
            "Time per image in each pipeline stage (queue, encode, retrieve, refine, ...).",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "geoloc_batch_size",
            "Images per micro-batch through the image tower.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge(
            "geoloc_queue_depth",
            "Images waiting for or in the model.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.verdicts = Counter(
            "geoloc_verdicts",
            "Located images by localizability verdict (located, uncertain, not_locatable; "
            "none: no verdict model is fitted, or a text query).",
            ["verdict"],
            registry=r,
        )
        self.localizability = Histogram(
            "geoloc_localizability_score",
            "The verdict's score per located image (0: unlike anything the model knows).",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
            registry=r,
        )
        self.problems = Counter(
            "geoloc_problems", "Problem responses by problem type.", ["type"], registry=r
        )
        self.prediction_write_failures = Counter(
            "geoloc_prediction_write_failures",
            "Answers given without a prediction id: the database did not take the row.",
            registry=r,
        )
        self.index_swaps = Counter(
            "geoloc_index_swaps", "Index versions swapped in while serving.", registry=r
        )
        self.index_info = Gauge(
            "geoloc_index_info",
            "The index version being served (1 while a live worker serves it).",
            ["index"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._index: str | None = None
        self._depth: Callable[[], int] | None = None

    @staticmethod
    def multiprocess_dir() -> str | None:
        """The shared directory of a replica's workers; None in a single process."""
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

    def track_queue(self, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the queue gauge: read at scrape time in one process; with
        several workers each writes its own at every request's start and end."""
        if self.multiprocess_dir() is None:
            self.queue_depth.set_function(depth)
        else:
            self._depth = depth

    def refresh(self) -> None:
        if self._depth is not None:
            self.queue_depth.set(self._depth())

    def observe(self, timings_ms: Mapping[str, float], verdict: Mapping[str, Any] | None) -> None:
        """One located image: its time per stage and its localizability verdict."""
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)
        self.verdicts.labels(verdict["verdict"] if verdict else "none").inc()
        if verdict:
            self.localizability.observe(float(verdict["score"]))

    def set_index(self, label: str) -> None:
        if self._index is not None and self._index != label:
            # 0, not removed: with several workers the old value stays in this worker's file
            self.index_info.labels(self._index).set(0)
        self._index = label
        self.index_info.labels(label).set(1)

    def _workers(self) -> CollectorRegistry | None:
        """Every worker's values, read from their files; None in a single process."""
        path = self.multiprocess_dir()
        if path is None:
            return None
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
        return registry

    def render(self) -> bytes:
        return generate_latest(self._workers() or self.registry)

    def request_counts(self) -> list[dict[str, Any]]:
        """Requests so far by route, method and status (for /v1/stats)."""
        out = []
        for metric in (self._workers() or self.requests).collect():
            if metric.name != "geoloc_http_requests":
                continue
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out.append({**s.labels, "count": int(s.value)})
        return sorted(out, key=lambda d: (d["route"], d["method"], d["status"]))


class MetricsMiddleware:
    """Counts every response by route template and status, and problem responses by type."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        self.metrics.refresh()
        status = 500
        is_problem = False
        body = bytearray()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, is_problem
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = dict(message.get("headers") or [])
                is_problem = headers.get(b"content-type", b"").startswith(
                    PROBLEM_MEDIA_TYPE.encode()
                )
            elif message["type"] == "http.response.body" and is_problem and len(body) < 65536:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            self.metrics.problems.labels("internal-error").inc()
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, scope.get("method", ""), str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.refresh()
        if is_problem:
            self.metrics.problems.labels(_problem_type(bytes(body))).inc()


def _problem_type(body: bytes) -> str:
    try:
        type_uri = str(json.loads(body).get("type", ""))
    except (ValueError, AttributeError):
        return "unknown"
    return type_uri.removeprefix(PROBLEM_BASE) or "unknown"
