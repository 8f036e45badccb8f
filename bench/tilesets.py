"""What the Blue Marble benches share: seeded tile sets cached under bench/out, the locator
in the service's default set-up (H3 land gallery + reference-image index, built through the
service's own functions and loaded as `geoloc serve` loads it), the pixel nearest-neighbour
baseline, and markdown tables.

Used by bench/accuracy.py, bench/shift.py and bench/llm.py.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders import GeoModel, get_profile, load_model
from encoders.bluemarble import TileStyle
from encoders.checkpoints import checkpoint_profile, load_checkpoint_model, same_as_registered
from encoders.model import read_checkpoint
from encoders.profiles import WEIGHTS_DIR
from encoders.structure import structure_descriptors
from index.store import latest_version, list_indexes
from service.config import Settings
from service.engine.loading import load_locator
from service.engine.locator import Locator
from service.jobs.datasets import LabelledImage, read_labelled_csv
from service.jobs.indexes import GallerySpec, add_reference_images, build_index
from service.jobs.setup import newest_manifest, references_problem
from service.jobs.training import TILE_STYLES, write_bluemarble_set

OUT = Path(__file__).resolve().parent / "out"
#: Training draws its tiles from seeds derived from 0 (docs/TRAINING.md); calibration and
#: the verification sweep use 4242.
TEST_SEED, REF_SEED, CALIB_SEED = 12345, 777, 4242
#: A copy: a bench may draw a kind in another style (bench/tune.py --ref-power).
STYLES: dict[str, TileStyle] = dict(TILE_STYLES)


def short_hash(value: object, n: int = 8) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:n]


def cached_set(out_dir: Path, write: Callable[[Path], object]) -> Path:
    """``out_dir``, written by ``write(tmp_dir)`` unless a finished copy is there already
    (finished: its ``done`` marker exists; a killed run leaves only a temporary folder)."""
    if not (out_dir / "done").is_file():
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.mkdir(parents=True)
        write(tmp)
        (tmp / "done").touch()
        tmp.rename(out_dir)
    return out_dir


def read_rows(out_dir: Path) -> list[LabelledImage]:
    rows, problems = read_labelled_csv(out_dir / "labels.csv")
    assert not problems, problems[:3]
    return rows


def tileset(kind: str, n: int, seed: int) -> list[LabelledImage]:
    """A set drawn by `geoloc data bluemarble` (kind: test, reference or train), keyed by its
    style so that a changed style draws a new set."""
    d = OUT / f"bm-{kind}-{n}-{seed}-{short_hash(STYLES[kind])}"
    return read_rows(
        cached_set(
            d, lambda tmp: write_bluemarble_set(tmp, n, seed=seed, kind=kind, style=STYLES[kind])
        )
    )


def write_labelled(out_dir: Path, items: Iterable[tuple[Image.Image, float, float]]) -> None:
    """Images as lossless PNG files plus labels.csv (image,lat,lon), as `geoloc eval` reads."""
    lines = ["image,lat,lon"]
    for i, (img, lat, lon) in enumerate(items):
        name = f"img_{i:06d}.png"
        img.save(out_dir / name)
        lines.append(f"{name},{lat:.6f},{lon:.6f}")
    (out_dir / "labels.csv").write_text("\n".join(lines) + "\n")


def latlon(rows: Sequence[LabelledImage]) -> np.ndarray:
    return np.array([[r.lat, r.lon] for r in rows], np.float64).reshape(-1, 2)


def pixels(paths: Sequence[Path], side: int = 16) -> np.ndarray:
    """Images as small normalised pixel vectors (the baseline's feature)."""
    out = np.empty((len(paths), side * side * 3), np.float32)
    for i, p in enumerate(paths):
        a = np.asarray(Image.open(p).convert("RGB").resize((side, side)), np.float32)
        out[i] = a.reshape(-1) / 255.0
    return out


def embed(model: GeoModel, rows: Sequence[LabelledImage], batch: int = 256) -> np.ndarray:
    chunks = []
    for s in range(0, len(rows), batch):
        chunks.append(model.embed_images([Image.open(r.path) for r in rows[s : s + batch]]))
    return np.concatenate(chunks)


def read_pictures(
    rows: Sequence[LabelledImage], locator: Locator, batch: int = 256
) -> dict[str, Any]:
    """What the service reads from the pictures before the pipeline (``Locator.read``), as
    ``locate_embeddings``'s keyword arguments: their structure descriptors (along their colour
    ramps, turned the way their best reference match runs) and colour thumbnails (each None
    where the locator compares none), and the grey views of those in false colour, which
    ``locate_embeddings`` locates as well. The files are opened as stored, as ``embed`` opens
    them: a heavy JPEG is neither smoothed nor marked as the service's decoder does
    (bench/shift.py and bench/parity.py decode as it does)."""
    structure, colour, views = [], [], []
    for s in range(0, len(rows), batch):
        described, thumbs, seen = locator.read([Image.open(r.path) for r in rows[s : s + batch]])
        structure.append(described)
        colour.append(thumbs)
        views.extend(seen)

    def joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
        return None if not parts or parts[0] is None else np.concatenate(parts)

    return {"structure": joined(structure), "colour": joined(colour), "views": views}


def luminance_descriptors(rows: Sequence[LabelledImage], batch: int = 256) -> np.ndarray:
    """The pictures' luminance layouts, as references are described."""
    chunks = []
    for s in range(0, len(rows), batch):
        chunks.append(structure_descriptors([Image.open(r.path) for r in rows[s : s + batch]]))
    return np.concatenate(chunks)


class PixelBaseline:
    """Nearest reference tile in pixel space (16x16 RGB, squared L2); its location wins."""

    def __init__(self, refs: Sequence[LabelledImage]) -> None:
        cache = refs[0].path.parent / "pixels16.npy"
        if cache.is_file():
            self.px = np.load(cache)
        else:
            self.px = pixels([r.path for r in refs])
            np.save(cache, self.px)
        self.latlon = latlon(refs)
        self.sq = (self.px**2).sum(1)

    def predict(self, paths: Sequence[Path], batch: int = 256) -> np.ndarray:
        q = pixels(paths)
        nn = np.empty(len(q), np.int64)
        for s in range(0, len(q), batch):
            nn[s : s + batch] = (self.sq[None, :] - 2 * q[s : s + batch] @ self.px.T).argmin(1)
        return self.latlon[nn]


# -- the model and the locator as the service serves them ------------------------------------


def bundled_weights(profile: str = "bluemarble") -> Path:
    return WEIGHTS_DIR / get_profile(profile).weights


def load_weights(path: Path) -> tuple[GeoModel, str]:
    """The model of a weights file, and a line that says how it was built: through the
    registered profile when the file's own profile config is the registry's, else from the
    config stored in the file (an older architecture, say)."""
    profile = checkpoint_profile(read_checkpoint(path), source=str(path))
    if same_as_registered(profile):
        model = load_model(profile.name, checkpoint=path)
        how = f"profile '{profile.name}' as registered"
    else:
        model = load_checkpoint_model(path)
        how = f"profile '{profile.name}' from the config stored in the file (not the registry's)"
    return model, how


def served_locator(
    model: GeoModel,
    *,
    weights: Path,
    res: int,
    refs: Sequence[LabelledImage],
    calibration: Sequence[LabelledImage] = (),
) -> tuple[Locator, Settings]:
    """The locator `make run` serves, loaded through ``load_locator``: the H3 res-``res`` land
    gallery as the default index, the reference tiles as the reference-image index and, when
    ``calibration`` tiles are given, the calibration fitted on them as `geoloc setup` fits it
    (with whatever the calibration artifact carries). Built once per weights file (its
    sha256), resolution, reference set and calibration set, in a data dir of their own."""
    bundled = weights.resolve() == bundled_weights(model.profile).resolve()
    sets = (refs[0].path.parent.name, calibration[0].path.parent.name if calibration else "")
    settings = Settings(
        data_dir=OUT / f"data-{model.profile}-{model.weights_id[:12]}-res{res}-{short_hash(sets)}",
        profile=model.profile,
        index_name="",
        reference_index="",
        calibration="latest",
        checkpoint=None if bundled else weights,
    )
    if not list_indexes(settings.index_dir, settings.default_index):
        build_index(settings, settings.default_index, GallerySpec(kind="h3", res=res), model=model)
    refs_name = f"refs-{model.profile}"
    built = newest_manifest(settings, refs_name)
    # Rebuilt (as `geoloc setup` rebuilds it) where a cached one lacks what verification uses.
    if built is None or references_problem(built, model.weights_id, self_data=True):
        add_reference_images(
            settings,
            refs[0].path.parent / "labels.csv",
            model=model,
            name=refs_name,
            runner="inprocess",
            batch_size=256,
            replace=built is not None,
        )
    if calibration:
        _calibrate(settings, model, calibration)
    return load_locator(settings, model=model), settings


class ServedSetup(NamedTuple):
    model: GeoModel
    how: str  # how the weights were loaded (load_weights)
    refs: list[LabelledImage]
    calibration: list[LabelledImage]
    locator: Locator
    settings: Settings


def served_setup(weights: Path, res: int, n_refs: int, n_calib: int) -> ServedSetup:
    """The weights, their reference tiles (seed REF_SEED), calibration tiles (CALIB_SEED; none
    when ``n_calib`` is 0) and the locator `make run` serves with them (``served_locator``)."""
    model, how = load_weights(weights)
    refs = tileset("reference", n_refs, REF_SEED)
    calib = tileset("train", n_calib, CALIB_SEED) if n_calib else []
    locator, settings = served_locator(
        model, weights=weights, res=res, refs=refs, calibration=calib
    )
    return ServedSetup(model, how, refs, calib, locator, settings)


def _calibrate(settings: Settings, model: GeoModel, rows: Sequence[LabelledImage]) -> None:
    """Fit and store the default index's calibration unless it has one whose verdict this
    version can use (`geoloc setup`'s step, through the same domain function)."""
    from service.engine.calibration import list_calibrations
    from service.jobs.evaluate import fit_calibration

    name = settings.default_index
    found = list_calibrations(settings.data_dir, name, latest_version(settings.index_dir, name))
    if found and not found[-1].verdict_problem:
        return
    uncalibrated = settings.model_copy(update={"calibration": "off"})
    locator = load_locator(uncalibrated, model=model)
    fit_calibration(uncalibrated, locator, list(rows), data=rows[0].path.parent / "labels.csv")


# -- output -----------------------------------------------------------------------------------


def machine_line() -> str:
    return (
        f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )


def command_line() -> str:
    return shlex.join([os.path.relpath(sys.executable), *sys.argv])


def pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"


def km(x: float) -> str:
    return "-" if x is None else ("inf" if math.isinf(x) else f"{x:,.1f}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
