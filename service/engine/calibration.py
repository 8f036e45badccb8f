"""Calibrated probabilities: fit the softmax temperature on held-out data, store it beside
the index version it was fitted for, load it with that version.

An artifact is one JSON file, ``<data>/calibrations/<index name>/<index version>/<version>.json``,
that describes itself: the fitted temperature, the event its probability states ("the truth
is within ``within_km`` of the top-1 candidate"), the data it was fitted on (path, sha256,
rows), the options and weights used, when, and the fit's before/after figures. Published
index files are never touched; a new fit is a new version, written atomically.

Format 2 adds ``localizability``: the verdict fitted on the same held-out pictures (the
in-domain positives) against generated negatives (service/engine/localizability.py), or
null. Format-1 files still load, without a verdict.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.geo import haversine_km
from service.engine.localizability import LocalizabilityModel
from service.engine.locator import LocateOptions, Locator, merge_places, nms_owners
from service.errors import GeolocError
from service.jobs.scores import reliability

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

FORMAT = 2
#: Formats this code reads (1: before the localizability verdict).
READABLE_FORMATS = (1, 2)
#: Temperatures searched (log-spaced); the best is then refined by golden-section search.
T_MIN, T_MAX = 0.02, 50.0


class CalibrationError(GeolocError):
    type = "invalid-calibration"
    status = 422


@dataclass(frozen=True)
class Calibration:
    temperature: float
    within_km: float
    version: str
    created_at: str
    index: str  # "name/version" it was fitted for
    profile: str
    #: weights_label: "bundled:<weights id>" or "<checkpoint file>:<weights id>"; files
    #: written before weights identities say "bundled" or the checkpoint file alone.
    weights: str
    data: dict[str, Any]  # path, sha256, rows
    options: dict[str, Any]  # the pipeline options of the fit
    fit: dict[str, Any]  # before/after figures on the fitting data
    format: int = FORMAT
    #: The fitted localizability verdict (LocalizabilityModel.to_dict); None: none (format 1).
    localizability: dict[str, Any] | None = None
    path: str = field(default="", compare=False)  # where it was read from (not stored)

    @property
    def label(self) -> str:
        return f"{self.version} (temperature {self.temperature:.3g})"

    @cached_property
    def judge(self) -> LocalizabilityModel | None:
        """The verdict of this calibration (None without one), built once; CalibrationError
        if unusable."""
        if self.localizability is None:
            return None
        try:
            return LocalizabilityModel.from_dict(self.localizability)
        except (KeyError, TypeError, ValueError) as exc:
            where = self.path or self.version
            raise CalibrationError(
                f"{where}: its localizability model cannot be used ({exc}); fit a new one "
                "(geoloc calibrate) or set GEOLOC_CALIBRATION=off"
            ) from None

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("path")
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path) -> Calibration:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") not in READABLE_FORMATS:
                raise CalibrationError(f"{path}: unknown format {d.get('format')!r}")
            cal = cls(**{k: v for k, v in d.items() if k != "path"}, path=str(path))
        except CalibrationError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise CalibrationError(f"{path}: not a calibration file: {exc}") from None
        if not (isinstance(cal.temperature, int | float) and 0 < cal.temperature < math.inf):
            raise CalibrationError(f"{path}: temperature {cal.temperature!r} is not > 0")
        _ = cal.judge  # a broken verdict is refused now, not on the first request
        return cal


def weights_label(checkpoint: Path | None, weights_id: str) -> str:
    """What a calibration records of the model's weights: where they came from ("bundled" or
    the checkpoint file) and which they are (``GeoModel.weights_id``), so that a calibration
    fitted for the previous bundled weights is not applied to new ones."""
    source = str(Path(checkpoint).resolve()) if checkpoint else "bundled"
    return f"{source}:{weights_id}"


def _unversioned(label: str) -> str:
    # The label a calibration written before weights identities has for the same source.
    return label.rpartition(":")[0]


# -- storage ----------------------------------------------------------------------------------


def calibration_dir(root: Path, index_name: str, index_version: str) -> Path:
    return Path(root) / "calibrations" / index_name / index_version


def list_calibrations(root: Path, index_name: str, index_version: str) -> list[Calibration]:
    """Every calibration of an index version, oldest first."""
    d = calibration_dir(root, index_name, index_version)
    if not d.is_dir():
        return []
    return [Calibration.from_file(p) for p in sorted(d.glob("*.json"))]


def save_calibration(root: Path, cal: Calibration) -> Path:
    """Publish atomically (temporary file, fsync, no-clobber link); never overwrites."""
    name, _, version = cal.index.partition("/")
    d = calibration_dir(root, name, version)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{cal.version}.json"
    tmp = d / f".tmp-{cal.version}-{uuid.uuid4().hex[:8]}"
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(cal.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, final)  # fails if the version exists: published files are immutable
        except FileExistsError:
            raise CalibrationError(f"calibration {final} exists already") from None
    finally:
        tmp.unlink(missing_ok=True)
    return final


def load_calibration(
    root: Path, index_name: str, index_version: str, which: str, *, profile: str, weights: str
) -> Calibration | None:
    """``which``: "latest" (None when there is none), "off" (None) or a version."""
    if which == "off":
        return None
    cals = list_calibrations(root, index_name, index_version)
    if which != "latest":
        cals = [c for c in cals if c.version == which]
        if not cals:
            raise CalibrationError(
                f"no calibration {which!r} for index {index_name}/{index_version} "
                f"(GEOLOC_CALIBRATION); fit one with `geoloc calibrate DATA.csv`",
                status=404,
            )
    if not cals:
        return None
    cal = cals[-1]
    if cal.profile == profile and cal.weights != weights and cal.weights == _unversioned(weights):
        # Fitted before weights were recorded: which weights is unknown. Kept, as the indexes
        # of that time are, so that existing deployments keep working; `geoloc setup` refits.
        log.warning(
            "calibration %s records weights %r without their identity: cannot check it was "
            "fitted for these weights (%s); fit a new one (geoloc calibrate) to have it checked",
            cal.path,
            cal.weights,
            weights,
        )
        return cal
    if cal.profile != profile or cal.weights != weights:
        raise CalibrationError(
            f"calibration {cal.path} was fitted for profile {cal.profile!r} with weights "
            f"{cal.weights!r}, the model is {profile!r} with {weights!r}: fit a new one "
            "(geoloc calibrate) or set GEOLOC_CALIBRATION=off"
        )
    return cal


# -- fitting ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    """One held-out image: its candidates' logits, which of them form the top-1 place (the
    pipeline ranks places at temperature 1, so the same for every temperature) and that
    place's distance to the truth."""

    logits: np.ndarray
    top_place: np.ndarray  # bool: merged into the top-1 place
    d_km: float


def prepare_cases(
    pools: list[tuple[np.ndarray, np.ndarray]],
    truths: np.ndarray,
    *,
    nms_km: float,
    diversify: bool,
) -> list[_Case]:
    cases = []
    for (latlon, logits), (lat, lon) in zip(pools, np.asarray(truths), strict=True):
        if not len(logits):
            continue
        order = np.argsort(-logits, kind="stable")
        pts, z = latlon[order], logits[order]
        owner = nms_owners(pts, nms_km) if diversify else np.arange(len(pts))
        keep, _ = merge_places(owner, np.exp(z - z[0]))
        d = float(haversine_km(pts[keep[0], 0], pts[keep[0], 1], lat, lon))
        cases.append(_Case(z, owner == keep[0], d))
    return cases


def top1(cases: list[_Case], temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(probability, error km) of each case's top-1 place at a temperature, as the
    pipeline states them (softmax, then diversify's merge)."""
    conf = np.empty(len(cases))
    for i, c in enumerate(cases):
        p = np.exp((c.logits - c.logits[0]) / temperature)
        conf[i] = p[c.top_place].sum() / p.sum()
    return conf, np.array([c.d_km for c in cases])


def _nll(conf: np.ndarray, hit: np.ndarray) -> float:
    c = np.clip(conf, 1e-6, 1 - 1e-6)
    return float(-np.mean(np.where(hit, np.log(c), np.log1p(-c))))


def fit_temperature(
    cases: list[_Case], *, within_km: float, bins: int = 10
) -> tuple[float, dict[str, Any]]:
    """The temperature minimising the log loss of "top-1 within ``within_km``" given the
    top-1 probability; and the fit's figures at temperature 1 and at the fitted one."""
    if len(cases) < 20:
        raise CalibrationError(f"{len(cases)} usable images; calibration needs at least 20")

    def loss(log_t: float) -> float:
        conf, err = top1(cases, math.exp(log_t))
        return _nll(conf, err <= within_km)

    grid = np.linspace(math.log(T_MIN), math.log(T_MAX), 41)
    losses = [loss(g) for g in grid]
    b = int(np.argmin(losses))
    lo, hi = grid[max(b - 1, 0)], grid[min(b + 1, len(grid) - 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(30):  # golden-section search in the bracket around the best grid point
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if loss(x1) <= loss(x2):
            hi = x2
        else:
            lo = x1
    best = math.exp((lo + hi) / 2)

    def figures(t: float) -> dict[str, Any]:
        conf, err = top1(cases, t)
        rel = reliability(conf, err, within_km=within_km, bins=bins)
        return {
            "temperature": t,
            "log_loss": _nll(conf, err <= within_km),
            "ece": rel.ece,
            "mean_confidence": rel.mean_confidence,
            "accuracy": rel.accuracy,
            "median_km": float(np.median(err)),
        }

    return best, {"images": len(cases), "before": figures(1.0), "after": figures(best)}


# -- localizability -----------------------------------------------------------------------------

#: The seed of the generated negatives' stream (tests draw theirs with other seeds).
NEGATIVES_SEED = 1_405_001


def fit_localizability_for(
    locator: Locator,
    image_stats: np.ndarray,
    vectors: np.ndarray,
    options: LocateOptions,
    *,
    per_kind: int,
    seed: int = NEGATIVES_SEED,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> LocalizabilityModel:
    """Fit the verdict of ``locator``: its held-out in-domain pictures (their image statistics
    and embeddings) against ``per_kind`` generated negatives of each kind of the profile's
    domain, which go through the same model and index."""
    from encoders import get_profile
    from service.engine.localizability import fit_localizability, image_statistics_many
    from service.engine.negatives import kinds_for, negatives

    profile = get_profile(locator.model.profile)
    pos = locator.judge_features(vectors, image_stats, options)
    rows: list[np.ndarray] = []
    kinds: list[str] = []

    def run(batch: Iterable[tuple[str, Image.Image]]) -> None:
        names, images = zip(*batch, strict=True)
        rows.append(
            locator.judge_features(locator.embed(images), image_statistics_many(images), options)
        )
        kinds.extend(names)
        if progress is not None:
            progress(len(images))

    batch: list[tuple[str, Image.Image]] = []
    for item in negatives(kinds_for(profile.domain), per_kind, seed, profile.domain):
        batch.append(item)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    refs = locator.neighbours.manifest if locator.neighbours is not None else None
    return fit_localizability(
        pos,
        np.vstack(rows),
        kinds,
        purpose=profile.purpose,
        domain=profile.domain,
        notes={
            "reference_index": f"{refs.name}/{refs.version}" if refs else None,
            "negatives_seed": seed,
        },
    )
