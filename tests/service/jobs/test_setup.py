"""`geoloc setup` (what `make run` runs before serving) as a real process on a fresh data
directory: it builds the default gallery, the bluemarble reference-image index and the
calibration, the locator then serves neighbours, and a second run builds nothing new."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from index.store import (
    COLOUR_FILE,
    STRUCTURE_FILE,
    WIDTH_FILE,
    PointTable,
    list_indexes,
    publish_index,
)
from service.config import Settings
from service.engine.calibration import list_calibrations
from service.engine.loading import load_locator
from service.engine.localizability import FEATURES, image_statistics_many
from service.jobs.setup import served_version

ROOT = Path(__file__).resolve().parents[3]
SMALL = {
    "GEOLOC_DEFAULT_RES": "2",
    "GEOLOC_SETUP_REFERENCE_TILES": "300",
    "GEOLOC_SETUP_CALIBRATION_TILES": "200",
    "GEOLOC_CALIBRATION_NEGATIVES": "30",  # the verdict is fitted, on fewer pictures
}


def _setup(data: Path, **extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_")}
    env |= {**SMALL, "GEOLOC_DATA_DIR": str(data), **extra}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli.main", "setup"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Traceback" not in out, out
    return done.stdout


def _state(data: Path) -> dict[str, object]:
    indexes = sorted(f"{m.name}/{m.version}" for m in list_indexes(data))
    cal = {i: [c.version for c in list_calibrations(data, *i.split("/"))] for i in indexes}
    return {"indexes": indexes, "calibrations": cal}


def test_setup_builds_gallery_references_and_calibration_once(tmp_path):
    data = tmp_path / "data"
    out = _setup(data)
    for step in ("[1/4] database", "[2/4] gallery", "[3/4] references", "[4/4] calibration"):
        assert step in out, out
    s = Settings(data_dir=data)
    refs = list_indexes(data, "refs-bluemarble")
    assert len(refs) == 1 and refs[0].count == 300 and refs[0].gallery_kind == "images"
    (gallery,) = list_indexes(data, "default-bluemarble")
    assert gallery.h3_resolution == 2
    assert not (data / "setup" / "references").exists()  # the rendered tiles are gone
    assert (data / "setup" / "calibration" / "labels.csv").is_file()

    loc = load_locator(s)
    assert loc.neighbours is not None and len(loc.neighbours) == 300
    assert loc.calibration is not None  # the served version got a calibration
    assert loc.calibration.index == f"default-bluemarble/{served_version(s, 'default-bluemarble')}"
    assert loc.calibration.data["rows"] == 200
    with Image.open(data / "setup" / "calibration" / "tile_000000.jpg") as im:
        (r,) = loc.locate([im.convert("RGB")], s.locate_options(return_neighbours=True))
    assert r.extra["neighbours"]  # Geo-alignment ran: reference images were retrieved
    # ... and verification compared their structure with the picture's.
    assert STRUCTURE_FILE in refs[0].files and "structure" in r.extra["neighbours"][0]
    # ... and their colours (a clean tile of the reference set's own map agrees closely with
    # some of its neighbours).
    assert COLOUR_FILE in refs[0].files and "colour" in r.extra["neighbours"][0]
    # ... and knows the ground each reference view shows (255-637 km: REFERENCE_STYLE at 64 px).
    assert WIDTH_FILE in refs[0].files
    assert 200 < r.extra["neighbours"][0]["width_km"] < 2200
    # The calibration records the reference index it was fitted with.
    assert loc.calibration.options["references"] == f"refs-bluemarble/{refs[0].version}"

    before = _state(data)
    again = _setup(data)
    assert _state(data) == before  # nothing new
    assert "exists" in again and "has calibration" in again, again
    assert "rendering" not in again and "building" not in again, again

    # A reference index from before structure descriptors (or view widths, or colour
    # thumbnails) were stored is rebuilt with them, and the calibration fitted with the old
    # one is fitted again.
    for kept, why in (
        ((), "no structure descriptors"),
        (("structure",), "no view widths"),
        (("structure", "width"), "no colour thumbnails"),
    ):
        loc = load_locator(s)
        served, fitted = loc.neighbours, loc.calibration.options["references"]
        assert served is not None
        old = served.points
        publish_index(
            s.index_dir,
            "refs-bluemarble",
            served.vectors(np.arange(len(served))),
            PointTable(
                np.asarray(old.ids),
                np.asarray(old.latlon),
                np.asarray(old.country),
                structure=np.asarray(old.structure) if "structure" in kept else None,
                width=np.asarray(old.width) if "width" in kept else None,
            ),
            profile="bluemarble",
            gallery_kind="images",
            h3_resolution=None,
            extra=dict(served.manifest.extra),
        )
        if "width" in kept:  # ... and its job's shards, from that release, hold none either
            for shard in (data / "jobs").glob("refs-*/out/*.npz"):
                with np.load(shard) as z:
                    members = {k: z[k] for k in z.files if k != "colour"}
                np.savez(shard, **members)
        out = _setup(data)
        assert f"stores {why}" in out, out
        assert f"was fitted with {fitted}" in out, out
        newest = max(list_indexes(data, "refs-bluemarble"), key=lambda m: (m.created_at, m.version))
        assert {STRUCTURE_FILE, WIDTH_FILE, COLOUR_FILE} <= set(newest.files)
        assert newest.count == 300
        loc = load_locator(s)
        assert loc.compares_structure and loc.neighbours.points.width is not None
        assert loc.compares_colour  # encoded again, not published as unknown
        assert np.asarray(loc.neighbours.points.colour).any(axis=1).all()
        assert loc.calibration.options["references"] == f"refs-bluemarble/{newest.version}"

    # The verdict weighs the best layout match among the references ...
    loc = load_locator(s)
    assert loc.judge is not None and loc.judge.uses_refs
    with Image.open(data / "setup" / "calibration" / "tile_000001.jpg") as im:
        tile = im.convert("RGB")
    noise = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), np.uint8))
    q = loc.embed([tile, noise])
    feats = loc.judge_features(
        q, image_statistics_many([tile, noise]), s.locate_options(), loc.structure([tile, noise])
    )
    best = feats[:, FEATURES.index("ref_best_structure")]
    assert best[0] > best[1] + 0.2, best
    # ... and one fitted on an earlier version's features is fitted again.
    cal = loc.calibration
    raw = json.loads(Path(cal.path).read_text())
    raw["localizability"]["format"] = 1
    Path(cal.path).write_text(json.dumps(raw))
    out = _setup(data)
    assert "has a verdict this version cannot use" in out, out
    assert load_locator(s).judge is not None
    # ... and so is one fitted under other options that shape the logits, or another scoring
    # (a release before near copies recorded neither).
    cal = load_locator(s).calibration
    assert cal.options["near_copy_km"] == s.locate_options().near_copy_km
    raw = json.loads(Path(cal.path).read_text())
    for key in ("near_copy_colour", "near_copy_km", "scoring"):
        del raw["options"][key]
    Path(cal.path).write_text(json.dumps(raw))
    out = _setup(data)
    changed = "near_copy_colour, near_copy_km, scoring"
    assert f"was fitted with other pipeline options or scoring ({changed})" in out, out
    assert load_locator(s).calibration.version != cal.version
    assert "has calibration" in _setup(data)


def test_setup_exports_the_image_runtime_it_is_asked_for(tmp_path):
    """With GEOLOC_IMAGE_RUNTIME=onnx, setup exports the tower into the data dir (where a
    cluster's index job can write it), as a step of its own, once."""
    data = tmp_path / "data"
    env_runtime = {"GEOLOC_IMAGE_RUNTIME": "onnx", "GEOLOC_IMAGE_PRECISION": "int8"}
    out = _setup(data, **env_runtime)
    assert "[2/5] image runtime: onnx int8 export of weights" in out, out
    manifest = data / "runtimes" / "bluemarble" / "onnx-int8" / "manifest.json"
    exported = manifest.read_text()
    again = _setup(data, **env_runtime)
    assert "[2/5] image runtime: onnx int8" in again
    assert manifest.read_text() == exported  # the same export (its created_at), not a new one
