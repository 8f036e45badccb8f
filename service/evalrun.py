"""Run a Locator over a labelled image set and measure it (``geoloc eval``, ``geoloc
calibrate``): the metrics themselves are in service/evaluation.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.datasets import LabelledImage
from service.evaluation import THRESHOLDS_KM, errors_km, region_areas, report
from service.images import read_image_files
from service.pipeline import LocateOptions, LocateResult, Locator


@dataclass
class Embedded:
    rows: list[LabelledImage]  # the rows whose image could be read
    vectors: np.ndarray  # (n, D) image embeddings
    problems: list[str]  # one line per unreadable image


def embed_rows(
    locator: Locator,
    rows: list[LabelledImage],
    *,
    max_bytes: int,
    max_pixels: int,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Embedded:
    """Read and embed the images in batches; unreadable ones become problem lines."""
    kept: list[LabelledImage] = []
    vectors: list[np.ndarray] = []
    problems: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images, ok, bad = read_image_files(
            [r.path for r in chunk], max_bytes=max_bytes, max_pixels=max_pixels
        )
        problems += bad
        kept += [chunk[i] for i in ok]
        if images:
            vectors.append(locator.embed(images))
        if progress is not None:
            progress(len(chunk))
    dim = locator.model.embed_dim
    return Embedded(kept, np.concatenate(vectors) if vectors else np.zeros((0, dim)), problems)


def eval_options(base: LocateOptions, **changes: Any) -> LocateOptions:
    """Options for evaluation: top-1 only, no place names, and the whole ranked region
    (share 1) so that Recall-vs-Area can follow the ranking to its end."""
    return replace(base, top_k=1, describe=False, region_share=1.0, **changes)


def measure(
    truths: np.ndarray,
    results: list[LocateResult],
    *,
    within_km: float,
    bins: int,
    truth_countries: np.ndarray | None = None,
) -> dict[str, Any]:
    """The evaluation report of located images against their truths (JSON-ready)."""
    truths = np.asarray(truths, dtype=np.float64).reshape(-1, 2)
    # A filter can leave an image without any candidate: counted, not measured.
    has = np.array([bool(r.candidates) for r in results], dtype=bool)
    answered = [r for r, h in zip(results, has, strict=True) if h]
    truths = truths[has]
    pred = np.array([(r.candidates[0].lat, r.candidates[0].lon) for r in answered]).reshape(-1, 2)
    d = errors_km(pred, truths)
    conf = np.array([r.candidates[0].probability for r in answered])
    areas = region_areas([r.region for r in answered], truths)
    out = report(
        d,
        conf,
        areas,
        within_km=within_km,
        bins=bins,
        truth_countries=None if truth_countries is None else np.asarray(truth_countries)[has],
        points=np.column_stack([truths, d]),
    )
    return {"no_answer": int((~has).sum()), **out}


def _pct(v: float | None) -> str:
    return "     -" if v is None or not math.isfinite(v) else f"{100 * v:5.1f}%"


def km2(v: float | None) -> str:
    return "not reached" if v is None else f"{v:,.0f} km²"


def format_report(rep: dict[str, Any], *, label: str = "", groups: int = 15) -> str:
    """The report as terminal tables."""
    th = [f"{t:g}" for t in THRESHOLDS_KM]
    head = "".join(f"{t + ' km':>9}" for t in th)
    lines = [
        f"{label}n={rep['n']}",
        f"  {'':22}{head}{'median km':>11}{'GeoScore':>10}",
    ]

    def row(name: str, s: dict[str, Any]) -> str:
        cells = "".join(f"{_pct(s['within_km'][t]):>9}" for t in th)
        med, score = s["median_km"], s["mean_geoscore"]
        med_s = f"{'-':>11}" if med is None else f"{med:11.1f}"
        score_s = f"{'-':>10}" if score is None else f"{score:10.0f}"
        return f"  {name[:20]:22}{cells}{med_s}{score_s}  (n={s['n']})"

    lines.append(row("all", rep))
    for title, key in (("continent", "by_continent"), ("country", "by_country")):
        if key not in rep:
            continue
        items = list(rep[key].items())
        lines.append(
            f"  by {title}"
            + (f" (largest {groups} of {len(items)})" if len(items) > groups else "")
        )
        lines += [row(f"  {k}", v) for k, v in items[:groups]]
    rva = rep["recall_vs_area"]
    at = rva["area_km2_at_recall"]
    lines.append(
        "  recall vs area: "
        + ", ".join(f"{float(r):.0%} recall within {km2(a)}" for r, a in at.items())
        + f"; {_pct(rva['recall_in_region']).strip()} of truths inside the ranked region"
    )
    cal = rep["calibration"]
    if cal["n"]:
        lines.append(
            f"  calibration (top-1 within {cal['within_km']:g} km): ECE {cal['ece']:.3f}, "
            f"mean probability {cal['mean_confidence']:.3f}, accuracy {cal['accuracy']:.3f}"
        )
    return "\n".join(lines)
