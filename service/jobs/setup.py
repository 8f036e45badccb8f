"""`geoloc setup`: build, once, everything the default service runs with (`make run`).

Steps, each skipped when its result exists and was made with the model's weights (the
``weights_id`` of encoders/profiles.py, recorded in manifests and calibrations), so running it
again does nothing new, and an interrupted run resumes (rendered tile sets are reused, the
reference job keeps its finished shards). An index or calibration made with other weights (a
new release's bundled weights, another GEOLOC_CHECKPOINT), or an index that records none
(built before weights were recorded), is treated as missing: a new version is built beside
it and nothing is deleted.

1. database: migrate to head (what `geoloc db upgrade` does);
2. gallery: the default H3 gallery index (`geoloc index build --res GEOLOC_DEFAULT_RES`);
   a new version replacing a stale one is activated where the database names an active one;
3. references: the image-neighbour index ``refs-<profile>`` (G3's Geo-alignment). A profile
   that makes its own data (bluemarble) renders GEOLOC_SETUP_REFERENCE_TILES clean tiles
   under ``<data>/setup/references`` and embeds them through `geoloc images add`'s job
   (in-process); the tiles are deleted once published (the index keeps their embeddings and
   GPS, which is all a neighbour needs; they are ~4 KB each). A new version replacing a stale
   one (other weights, or built before structure descriptors, view widths or colour
   thumbnails were stored)
   holds only the tiles (`images add --replace`). Other profiles take reference photos
   from the user (`geoloc images add`);
4. calibration: for the served index version, unless one exists that was fitted with these
   weights and the reference index served now (its neighbours are part of the logits), fitted on
   GEOLOC_SETUP_CALIBRATION_TILES held-out tiles (augmented, another seed), kept under
   ``<data>/setup/calibration`` (the calibration record names them).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from index.store import (
    COLOUR_FILE,
    STRUCTURE_FILE,
    WIDTH_FILE,
    IndexWeightsError,
    Manifest,
    latest_version,
    list_indexes,
)
from service.config import Settings
from service.engine.options import LOGIT_OPTIONS, SCORING

#: Profiles that can render their own reference and held-out images.
SELF_DATA_PROFILES = frozenset({"bluemarble"})
#: Style of the held-out calibration tiles (service/jobs/training.py): in-domain with training's
#: changes of sensor, colour and zoom, what the localizability model is fitted on.
HELD_OUT_KIND = "train"

Echo = Callable[[str], None]


class _Model:
    """The model, loaded once and only when a step needs it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._model: Any = None
        self._weights_id: str | None = None

    def weights_id(self) -> str:
        """The weights identity, from the loaded model or else from the weight files alone
        (hashing them costs far less than loading the model)."""
        if self._model is not None:
            return str(self._model.weights_id)
        if self._weights_id is None:
            from encoders.profiles import weights_id

            s = self.settings
            self._weights_id = weights_id(
                s.profile, checkpoint=s.checkpoint, backbone_checkpoint=s.backbone_checkpoint
            )
        return self._weights_id

    def get(self) -> Any:
        if self._model is None:
            from service.engine.loading import load_geomodel

            self._model = load_geomodel(self.settings)
        return self._model


def run_setup(settings: Settings, *, echo: Echo = print, progress: bool = True) -> list[str]:
    """Run the steps; returns one line per step saying what it did (and echoes as it goes)."""
    s = settings
    model = _Model(s)
    steps = [
        ("database", lambda: _database(s, echo)),
        # Another image runtime is exported here, where the data dir is writable (replicas
        # may mount it read-only); loading the model exports a missing or stale one.
        *([("image runtime", lambda: _image_runtime(model))] if s.image_runtime != "torch" else []),
        ("gallery", lambda: _gallery(s, model, echo, progress)),
        ("references", lambda: _references(s, model, echo, progress)),
        ("calibration", lambda: _calibration(s, model, echo, progress)),
    ]
    lines = []
    t_all = time.perf_counter()
    with _one_setup_at_a_time(s):
        for i, (name, step) in enumerate(steps, 1):
            echo(f"[{i}/{len(steps)}] {name} ...")
            t0 = time.perf_counter()
            what = step()
            line = f"[{i}/{len(steps)}] {name}: {what} ({time.perf_counter() - t0:.0f} s)"
            echo(line)
            lines.append(line)
    echo(f"setup done in {time.perf_counter() - t_all:.0f} s")
    return lines


@contextlib.contextmanager
def _one_setup_at_a_time(s: Settings) -> Iterator[None]:
    """A second `geoloc setup` on the same database fails at once instead of rendering into
    the tile folders the first one is using (the index build locks, by another name)."""
    from service.db import IndexBuildLockedError, index_build_lock

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(index_build_lock(s.db_url, ".setup", s.database_connect_timeout_s))
        except IndexBuildLockedError:
            raise IndexBuildLockedError(
                "another `geoloc setup` is running on this database; wait for it to finish"
            ) from None
        yield


def _database(s: Settings, echo: Echo) -> str:
    from service.db import current_revision, display_url, make_engine, upgrade

    engine = make_engine(s.db_url)
    try:
        before = current_revision(engine)
    finally:
        engine.dispose()
    after = upgrade(s.db_url, "head", wait_s=s.database_start_timeout_s)
    if before == after:
        return f"{display_url(s.db_url)} already at {after}"
    return f"{display_url(s.db_url)} upgraded {before or 'empty'} -> {after}"


def _image_runtime(model: _Model) -> str:
    m = model.get().image_runtime.manifest
    return f"{m.runtime} {m.precision} export of weights {m.weights} ({m.created_at})"


def _exists(s: Settings, name: str) -> bool:
    return bool(list_indexes(s.index_dir, name))


def newest_manifest(s: Settings, name: str) -> Manifest | None:
    """The newest version of an index (what the service serves of a reference index)."""
    return max(
        list_indexes(s.index_dir, name), key=lambda m: (m.created_at, m.version), default=None
    )


def _stale(m: Manifest, weights: str) -> str:
    """Why index version ``m`` is not what a model with ``weights`` needs ("": it is)."""
    if m.weights == weights:
        return ""
    if m.weights is None:
        return "records no model weights (built before they were recorded)"
    return f"was built with other model weights ({m.weights}; the model has {weights})"


def references_problem(m: Manifest, weights: str, self_data: bool) -> str:
    """Why reference index version ``m`` is not what this release's verification needs from a
    model with ``weights`` ("": it is). ``self_data``: the profile renders its own references,
    which record their view widths."""
    if stale := _stale(m, weights):
        return stale
    if STRUCTURE_FILE not in m.files:
        return "stores no structure descriptors (built before verification compared them)"
    if self_data and WIDTH_FILE not in m.files:
        return "stores no view widths (built before verification used them)"
    if COLOUR_FILE not in m.files:
        return "stores no colour thumbnails (built before verification compared them)"
    return ""


def _activate_in_place(s: Settings, name: str, old: str, new: str, echo: Echo) -> bool:
    """Activate ``new`` when the database names ``old`` the active version of ``name`` (else
    the newest version is served, which ``new`` is); True when it did."""
    from service.db import (
        activate_index,
        active_index_version,
        make_engine,
        make_sessionmaker,
    )

    engine = make_engine(s.db_url, s.database_wait_s)
    try:
        with make_sessionmaker(engine)() as session:
            row = active_index_version(session, name)
            if row is None or row.version != old:
                return False
            activate_index(session, name, new)
            return True
    except SQLAlchemyError as exc:
        echo(f"note: could not activate {name}/{new} ({exc.__class__.__name__})")
        return False
    finally:
        engine.dispose()


def _record_versions(s: Settings, echo: Echo) -> None:
    """Register the published versions in the database (as `geoloc index build` does)."""
    from service.db import make_engine, make_sessionmaker, sync_index_versions

    engine = make_engine(s.db_url, s.database_wait_s)
    try:
        with make_sessionmaker(engine)() as session:
            sync_index_versions(session, s.index_dir)
    except SQLAlchemyError as exc:
        echo(f"note: not recorded in the database ({exc.__class__.__name__})")
    finally:
        engine.dispose()


def _gallery(s: Settings, model: _Model, echo: Echo, progress: bool) -> str:
    name = s.default_index
    served: Manifest | None = None
    stale = ""
    if _exists(s, name):
        version = served_version(s, name)
        served = next((m for m in list_indexes(s.index_dir, name) if m.version == version), None)
        if served is None:  # a pinned version that is not here: serve says so
            return f"{name}/{latest_version(s.index_dir, name)} exists"
        stale = _stale(served, model.weights_id())
        if not stale:
            return f"{name}/{version} exists"
        if s.index_version:
            if served.weights is None:  # serve loads it, with a warning
                return f"{name}/{version} (pinned by GEOLOC_INDEX_VERSION) {stale}; kept"
            raise IndexWeightsError(
                f"GEOLOC_INDEX_VERSION pins {name}/{version}, which {stale}: unset it "
                "(`geoloc setup` then builds a new version) or pin a version built with these "
                "weights"
            )
        echo(f"{name}/{version} {stale}: building a new version (the old one is kept)")
    from service.jobs.indexes import GallerySpec, build_index

    echo(f"building {name}: H3 land cells at res {s.default_res}")
    m = build_index(
        s, name, GallerySpec(kind="h3", res=s.default_res), model=model.get(), progress=progress
    )
    _record_versions(s, echo)
    line = f"built {m.name}/{m.version} ({m.count} points)"
    if served is not None:
        line += f"; {served.name}/{served.version} {stale}: kept"
        if _activate_in_place(s, name, served.version, m.version, echo):
            line += f", {m.version} activated in its place"
    return line


def _tiles(out: Path, count: int, *, seed: int, kind: str, progress: bool, echo: Echo) -> Path:
    """A rendered tile set, reused when a previous run finished writing it (labels.csv is
    written last) with this release's columns (the view widths)."""
    csv = out / "labels.csv"
    if csv.is_file():
        with csv.open() as fh:
            header, rows = fh.readline().strip(), sum(1 for _ in fh)
        if header.endswith(",width_km") and rows == count:
            echo(f"reusing {count} {kind} tiles in {out}")
            return csv
    from service.jobs.training import write_bluemarble_set

    shutil.rmtree(out, ignore_errors=True)
    echo(f"rendering {count} {kind} tiles into {out}")
    return write_bluemarble_set(out, count, seed=seed, kind=kind, progress=progress)


def _references(s: Settings, model: _Model, echo: Echo, progress: bool) -> str:
    name = s.reference_index or f"refs-{s.profile}"
    stale = ""
    old = newest_manifest(s, name)  # the service serves the newest version of a reference index
    if old is not None:
        stale = references_problem(old, model.weights_id(), s.profile in SELF_DATA_PROFILES)
        if not stale:
            return f"{name}/{old.version} exists"
        echo(f"{name}/{old.version} {stale}")
    if s.profile not in SELF_DATA_PROFILES and old is not None:
        return (
            f"{name}/{old.version} {stale}: rebuild it with `geoloc images add TABLE --name "
            f"{name} --replace` for its first table, then without --replace for the others"
        )
    if s.profile not in SELF_DATA_PROFILES:
        echo(
            f"profile {s.profile} takes its reference photos from you: "
            "`geoloc images add refs.csv` (image,lat,lon) builds the neighbour index"
        )
        return "skipped (no reference images of this profile's own)"
    if s.setup_reference_tiles <= 0:
        return "skipped (GEOLOC_SETUP_REFERENCE_TILES=0)" + (
            f"; {name}/{old.version} {stale}" if old is not None else ""
        )
    from service.jobs.indexes import add_reference_images

    out = s.data_dir / "setup" / "references"
    csv = _tiles(
        out,
        s.setup_reference_tiles,
        seed=s.setup_seed,
        kind="reference",
        progress=progress,
        echo=echo,
    )
    echo(f"embedding them into {name}")
    # 256 tiles a batch: about a third less CPU per tile than images add's 64 on small tiles.
    r = add_reference_images(
        s,
        csv,
        model=model.get(),
        name=name,
        runner="inprocess",
        batch_size=256,
        progress=progress,
        # The stale version's images are another model's vectors, or lack descriptors.
        replace=old is not None,
    )
    for p in r.problems[:20]:
        echo(f"warning: {p}")
    shutil.rmtree(out, ignore_errors=True)  # published: the index holds what neighbours need
    m = r.manifest
    line = f"built {m.name}/{m.version} ({m.count} reference images)"
    if old is not None:
        line += (
            f"; {old.name}/{old.version} {stale}: kept, its {old.count} images are not in the "
            "new version"
        )
    return line


def served_version(s: Settings, name: str) -> str:
    """The version `geoloc serve` starts with: pinned, else active in the database, else the
    newest."""
    if s.index_version:
        return s.index_version
    from service.db import active_index_version, make_engine, make_sessionmaker

    engine = make_engine(s.db_url, s.database_wait_s)
    try:
        with make_sessionmaker(engine)() as session:
            row = active_index_version(session, name)
        if row is not None:
            return row.version
    except SQLAlchemyError:
        pass
    finally:
        engine.dispose()
    return latest_version(s.index_dir, name)


def _calibration(s: Settings, model: _Model, echo: Echo, progress: bool) -> str:
    from service.engine.calibration import list_calibrations, weights_label

    if s.calibration != "latest":
        return f"skipped (GEOLOC_CALIBRATION={s.calibration})"
    name = s.default_index
    version = served_version(s, name)
    have = list_calibrations(s.data_dir, name, version)
    # The service applies the newest one; it must have been fitted for these weights.
    label = weights_label(s.checkpoint, model.weights_id())
    # ... and with the reference index served now: the neighbours are part of its logits.
    refs = newest_manifest(s, s.reference_index or f"refs-{s.profile}")
    refs_label = None if refs is None else refs.label
    if have and have[-1].profile == s.profile and have[-1].weights == label:
        fitted_with = have[-1].options.get("references", "an unrecorded reference index")
        unusable = have[-1].verdict_problem
        # ... and under the options that shape those logits now.
        served = s.locate_options()
        now = {k: getattr(served, k) for k in LOGIT_OPTIONS} | {"scoring": SCORING}
        changed = [k for k, v in now.items() if have[-1].options.get(k) != v]
        if fitted_with == refs_label and not unusable and not changed:
            return f"{name}/{version} has calibration {have[-1].label}"
        if unusable:
            why = f"has a verdict this version cannot use ({unusable})"
        elif fitted_with != refs_label:
            why = (
                f"was fitted with {fitted_with or 'no reference index'}, the service uses "
                f"{refs_label or 'none'}"
            )
        else:
            why = f"was fitted with other pipeline options or scoring ({', '.join(changed)})"
        echo(
            f"calibration {have[-1].version} of {name}/{version} {why}: fitting a new one "
            "(it is kept)"
        )
    elif have:
        echo(
            f"calibration {have[-1].version} of {name}/{version} was fitted for weights "
            f"{have[-1].weights!r}, the model has {label!r}: fitting a new one (it is kept)"
        )
    if s.profile not in SELF_DATA_PROFILES:
        echo(
            f"profile {s.profile} has no held-out images of its own: fit the calibration with "
            "`geoloc calibrate heldout.csv` (image,lat,lon)"
        )
        return "skipped (no held-out images of this profile's own)"
    if s.setup_calibration_tiles <= 0:
        return "skipped (GEOLOC_SETUP_CALIBRATION_TILES=0)"
    from tqdm import tqdm

    from service.engine.loading import load_locator
    from service.jobs.datasets import read_labelled_csv
    from service.jobs.evaluate import fit_calibration

    csv = _tiles(
        s.data_dir / "setup" / "calibration",
        s.setup_calibration_tiles,
        seed=s.setup_seed + 1,
        kind=HELD_OUT_KIND,
        progress=progress,
        echo=echo,
    )
    rows, problems = read_labelled_csv(csv)
    for p in problems[:20]:
        echo(f"warning: {p}")
    uncalibrated = s.model_copy(update={"calibration": "off"})
    loc = load_locator(uncalibrated, model=model.get(), index_version=version)
    echo(f"fitting the calibration of {loc.index_label} on {len(rows)} held-out tiles")
    with tqdm(total=len(rows), disable=not progress, unit="img", desc="calibration") as bar:
        r = fit_calibration(uncalibrated, loc, rows, data=csv, progress=bar.update)
    cal, after = r.calibration, r.calibration.fit["after"]
    return (
        f"temperature {cal.temperature:.3g} for {cal.index} (ECE {after['ece']:.3f}, "
        f"top-1 within {cal.within_km:g} km {after['accuracy']:.1%}) -> {r.path}"
    )
