"""Calibrated probabilities: the fitted softmax temperature (and localizability verdict), stored
beside the index version it was fitted for and loaded with that version. The fitting itself
is an offline job (service/jobs/calibrate.py).

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
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from index.files import atomic_write
from service.engine.localizability import LocalizabilityModel
from service.errors import GeolocError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

FORMAT = 2
#: Formats this code reads (1: before the localizability verdict).
READABLE_FORMATS = (1, 2)


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

    @property
    def verdict_problem(self) -> str:
        """Why its verdict cannot be used ("": it can, or it has none), e.g. one fitted on
        an earlier version's features."""
        try:
            _ = self.judge
        except CalibrationError as exc:
            return str(exc)
        return ""

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("path")
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_file(cls, path: Path, *, check_verdict: bool = True) -> Calibration:
        """The calibration in ``path``; CalibrationError if unreadable, or (``check_verdict``)
        if its verdict cannot be used, e.g. one fitted on an earlier version's features."""
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
        if check_verdict:
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
    """Every calibration of an index version, oldest first. Their verdicts are built when
    used: an older one whose verdict this version cannot use does not hide the newer ones."""
    d = calibration_dir(root, index_name, index_version)
    if not d.is_dir():
        return []
    return [Calibration.from_file(p, check_verdict=False) for p in sorted(d.glob("*.json"))]


def save_calibration(root: Path, cal: Calibration) -> Path:
    """Publish atomically (temporary file, fsync, no-clobber link); never overwrites."""
    name, _, version = cal.index.partition("/")
    d = calibration_dir(root, name, version)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{cal.version}.json"
    try:
        atomic_write(final, cal.to_json().encode("utf-8"), replace=False)
    except FileExistsError:
        raise CalibrationError(f"calibration {final} exists already") from None
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
    _ = cal.judge  # the served verdict is refused now, not on the first request
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
