"""Prometheus metrics of one app (its own registry, so several apps in one process stay apart).

With several uvicorn workers each process has its own counters: scrape each worker, or run one
worker per container (the usual deployment).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
            "geoloc_queue_depth", "Images waiting for or in the model.", registry=r
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
            "geoloc_index_info", "The index version being served (value 1).", ["index"], registry=r
        )

    def observe_stages(self, timings_ms: Mapping[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)

    def set_index(self, label: str) -> None:
        self.index_info.clear()
        self.index_info.labels(label).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def request_counts(self) -> list[dict[str, Any]]:
        """Requests so far by route, method and status (for /v1/stats)."""
        out = []
        for metric in self.requests.collect():
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
        if is_problem:
            self.metrics.problems.labels(_problem_type(bytes(body))).inc()


def _problem_type(body: bytes) -> str:
    try:
        type_uri = str(json.loads(body).get("type", ""))
    except (ValueError, AttributeError):
        return "unknown"
    return type_uri.removeprefix(PROBLEM_BASE) or "unknown"
