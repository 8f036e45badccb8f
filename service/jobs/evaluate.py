"""Run a Locator over a labelled image set and measure it (``geoloc eval``, ``geoloc
calibrate``): the metrics themselves are in service/engine/scores.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.engine.images import read_image_files
from service.engine.locator import LocateResult, Locator
from service.engine.options import LOGIT_OPTIONS, SCORING, ImageLimits, LocateOptions
from service.engine.scores import (
    THRESHOLDS_KM,
    errors_km,
    region_areas,
    report,
    summarize_distances,
)
from service.jobs.datasets import LabelledImage

if TYPE_CHECKING:
    from PIL import Image

    from service.config import Settings
    from service.engine.calibration import Calibration


@dataclass
class Embedded:
    rows: list[LabelledImage]  # the rows whose image could be read
    vectors: np.ndarray  # (n, D) image embeddings
    problems: list[str]  # one line per unreadable image
    #: (n, F) image statistics of the localizability verdict; None: not asked for.
    stats: np.ndarray | None = None
    #: (n, d) structure descriptors verification compares; None: the locator has none.
    structure: np.ndarray | None = None
    #: (n,) the grey views of pictures in false colour (``Locator.read``), None for the others;
    #: None: no picture has one. Kept until located, as the service locates them too.
    views: list[Image.Image | None] | None = None
    #: (n, d) colour thumbnails verification compares; None: the locator has none.
    colour: np.ndarray | None = None

    def part(self, rows: slice) -> dict[str, Any]:
        """The pictures' keyword arguments of ``Locator.locate_embeddings`` for ``rows``."""
        return {
            "image_stats": None if self.stats is None else self.stats[rows],
            "structure": None if self.structure is None else self.structure[rows],
            "views": None if self.views is None else self.views[rows],
            "colour": None if self.colour is None else self.colour[rows],
        }


def embed_rows(
    locator: Locator,
    rows: list[LabelledImage],
    *,
    limits: ImageLimits,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    image_stats: bool = False,
    grey_views: bool = False,
) -> Embedded:
    """Read and embed the images in batches; unreadable ones become problem lines. With
    ``image_stats``, also the pictures' localizability statistics; where the locator
    compares structure or colours, their structure descriptors and colour thumbnails (read as
    the service reads them, ``Locator.read``); with ``grey_views``, the grey views of
    those in false colour, for ``locate_embeddings`` to locate as the service does
    (``Locator.read``)."""
    from service.engine.localizability import image_statistics_many

    kept: list[LabelledImage] = []
    vectors: list[np.ndarray] = []
    stats: list[np.ndarray] = []
    structure: list[np.ndarray] = []
    colour: list[np.ndarray] = []
    views: list[Image.Image | None] = []
    problems: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images, ok, bad = read_image_files([r.path for r in chunk], limits)
        problems += bad
        kept += [chunk[i] for i in ok]
        if images:
            vectors.append(locator.embed(images))
            if image_stats:
                stats.append(image_statistics_many(images))
            # As the service reads them; the grey views drawn only where they are located.
            described, thumbs, seen = locator.read(images, with_views=grey_views)
            if grey_views:
                views += seen
            if described is not None:
                structure.append(described)
            if thumbs is not None:
                colour.append(thumbs)
        if progress is not None:
            progress(len(chunk))
    dim = locator.model.embed_dim
    return Embedded(
        kept,
        np.concatenate(vectors) if vectors else np.zeros((0, dim)),
        problems,
        (np.concatenate(stats) if stats else np.zeros((0, 0))) if image_stats else None,
        np.concatenate(structure) if structure else None,
        views if any(v is not None for v in views) else None,
        np.concatenate(colour) if colour else None,
    )


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
    return {
        "no_answer": int((~has).sum()),
        **out,
        "localizability": localizability_summary(results, has, d),
    }


def localizability_summary(
    results: list[LocateResult], has: np.ndarray, d_km: np.ndarray
) -> dict[str, Any] | None:
    """Verdict counts, abstentions, and accuracy on the answered share (the answers that did
    not abstain) beside accuracy on all images: coverage against accuracy. None when no answer
    carries a verdict. ``d_km``: the top-1 errors of the results with candidates (``has``)."""
    from service.engine.localizability import VERDICTS

    verdicts = [r.localizability for r in results]
    judged = [v for v in verdicts if v is not None]
    if not judged:
        return None
    abstained = np.array([bool(v is not None and v["abstained"]) for v in verdicts], dtype=bool)
    return {
        "judged": len(judged),
        "verdicts": {k: sum(v["verdict"] == k for v in judged) for k in VERDICTS},
        "abstained": int(abstained.sum()),
        "coverage": float(1 - abstained.mean()),
        "answered": summarize_distances(d_km[~abstained[has]]).to_dict(),
        "all": summarize_distances(d_km).to_dict(),
    }


def _pct(v: float | None) -> str:
    return "     -" if v is None or not math.isfinite(v) else f"{100 * v:5.1f}%"


def km2(v: float | None) -> str:
    return "not reached" if v is None else f"{v:,.0f} km²"


#: Two runs' top-1 answers "agree" when they are this close (the same gallery point or H3
#: cell centre is 0 km apart; refinement may move an answer to a neighbouring fine cell).
AGREE_KM = (1.0, 25.0)


def top1_agreement(rep: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Image by image, how often two `geoloc eval` runs over the same images give the same
    top-1 (within each of AGREE_KM), e.g. an int8 runtime against torch. An image that one
    run answered and the other did not counts as a disagreement; a path listed twice pairs
    its occurrences in order."""
    theirs: dict[str, list[Any]] = {}
    for a in other.get("answers", []):
        theirs.setdefault(a["image"], []).append(a["top1"])
    pairs, one_sided = [], 0
    for a in rep.get("answers", []):
        if not theirs.get(a["image"]):
            continue
        b = theirs[a["image"]].pop(0)
        if a["top1"] is None and b is None:
            continue
        if a["top1"] is None or b is None:
            one_sided += 1
        else:
            pairs.append((a["top1"], b))
    n = len(pairs) + one_sided
    if not n:
        return {"images": 0, "answered_by_one_only": 0, "within_km": {}}
    d = errors_km(
        np.array([p[0] for p in pairs]).reshape(-1, 2),
        np.array([p[1] for p in pairs]).reshape(-1, 2),
    )
    return {
        "images": n,
        "answered_by_one_only": one_sided,
        "against": other.get("label"),
        "within_km": {f"{t:g}": float(np.sum(d <= t)) / n for t in AGREE_KM},
    }


def format_agreement(rep: dict[str, Any], other: dict[str, Any]) -> str:
    """The agreement and the accuracy of both runs, as lines for the terminal."""
    agree = rep.get("agreement") or top1_agreement(rep, other)
    if not agree["images"]:
        return f"against {other.get('label')}: no image in common (was it run with --json?)"
    shares = ", ".join(f"{100 * v:.1f} % within {k} km" for k, v in agree["within_km"].items())
    lines = [f"against {other.get('label')}: the same top-1 on {shares} ({agree['images']} images)"]
    for name, r in (("this run", rep), ("the other", other)):
        within = "  ".join(
            f"{k} km {100 * v:5.1f} %" for k, v in r["within_km"].items() if v is not None
        )
        lines.append(f"  {name:9s} {within}")
    return "\n".join(lines)


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
    judged = rep.get("localizability")
    if judged:
        lines.append(row("answered", judged["answered"]))
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
    if judged:
        counts = ", ".join(f"{n} {k}" for k, n in judged["verdicts"].items())
        lines.append(
            f"  localizability: {counts}; abstained on {judged['abstained']} of "
            f"{judged['judged']} (coverage {_pct(judged['coverage']).strip()}); 'answered' is "
            "the accuracy without them"
        )
    return "\n".join(lines)


@dataclass
class Calibrated:
    calibration: Calibration  # the fit, as stored (or as it would be, when not stored)
    path: Path | None  # the stored file; None: not stored (dry run)
    problems: list[str]  # one line per unreadable image


def fit_calibration(
    settings: Settings,
    locator: Locator,
    rows: list[LabelledImage],
    *,
    data: Path,
    within_km: float | None = None,
    batch_size: int = 32,
    store: bool = True,
    progress: Callable[[int], None] | None = None,
    localizability: bool = True,
    negatives_per_kind: int | None = None,
    negatives_progress: Callable[[int], None] | None = None,
) -> Calibrated:
    """Fit the served calibration of ``locator``'s index version on held-out labelled images
    (``data`` is their CSV, recorded with its sha256) and store it, versioned, beside the index
    version: the one domain function of `geoloc calibrate` and `geoloc setup`.

    With ``localizability`` the same images are the in-domain positives of the verdict, fitted
    against ``negatives_per_kind`` (default GEOLOC_CALIBRATION_NEGATIVES; 0: no verdict)
    generated pictures of each negative kind (``negatives_progress`` counts them).

    ``locator`` should be loaded uncalibrated (GEOLOC_CALIBRATION=off): places are ranked at
    temperature 1 and the fit starts from the raw candidate logits.
    """
    from datetime import UTC, datetime

    from index.files import sha256_file
    from index.store import new_version
    from service.engine.calibration import Calibration, save_calibration, weights_label
    from service.jobs.calibrate import fit_localizability_for, fit_temperature, prepare_cases

    opts = settings.locate_options(top_k=1, describe=False)
    per_kind = settings.calibration_negatives if negatives_per_kind is None else negatives_per_kind
    localizability = localizability and per_kind > 0
    emb = embed_rows(
        locator,
        rows,
        limits=settings.image_limits(),
        batch_size=batch_size,
        progress=progress,
        image_stats=localizability,
    )
    pools = locator.candidate_logits(emb.vectors, opts, structure=emb.structure, colour=emb.colour)
    truths = np.array([(r.lat, r.lon) for r in emb.rows]).reshape(-1, 2)
    within = settings.calibration_km if within_km is None else within_km
    cases = prepare_cases(pools, truths, nms_km=opts.nms_km, diversify=opts.diversify)
    temperature, fit = fit_temperature(cases, within_km=within)
    judge = None
    if localizability and emb.stats is not None:
        judge = fit_localizability_for(
            locator,
            emb.stats,
            emb.vectors,
            opts,
            per_kind=per_kind,
            structure=emb.structure,
            batch_size=batch_size,
            progress=negatives_progress,
        )
    m = locator.index.manifest
    cal = Calibration(
        temperature=temperature,
        within_km=within,
        version=new_version(),
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        index=m.label,
        profile=locator.model.profile,
        weights=weights_label(settings.checkpoint, locator.model.weights_id),
        data={"path": str(data.resolve()), "sha256": sha256_file(data), "rows": len(emb.rows)},
        # The neighbours' support is part of the logits fitted here: the options that shape
        # them and the reference index are recorded, and setup refits when either changes.
        options={k: getattr(opts, k) for k in LOGIT_OPTIONS}
        | {"scoring": SCORING, "references": locator.references_label},
        fit=fit,
        localizability=judge.to_dict() if judge is not None else None,
    )
    path = save_calibration(settings.data_dir, cal) if store else None
    return Calibrated(cal, path, emb.problems)
