"""Indexes and calibrations record the model weights that made them (``GeoModel.weights_id``).

A retrained model of the same profile and dimension (simulated by a checkpoint of the bundled
model with changed weights, saved and loaded through save_checkpoint/load_model) must not be
served with indexes or calibrations of the bundled weights, and `geoloc setup` builds new
versions beside them; artifacts from before weights were recorded keep loading, with a warning.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from encoders import GeoModel, get_profile, load_model, save_checkpoint
from encoders.model import RANDOM_WEIGHTS
from encoders.profiles import WEIGHTS_DIR, build_model, weights_id
from index.files import sha256_file
from index.store import IndexWeightsError, list_indexes
from service.config import Settings
from service.db import (
    activate_index,
    make_engine,
    make_sessionmaker,
    sync_index_versions,
    upgrade,
)
from service.engine.calibration import (
    Calibration,
    CalibrationError,
    list_calibrations,
    load_calibration,
    save_calibration,
    weights_label,
)
from service.engine.loading import load_locator
from service.engine.options import ImageLimits
from service.errors import GeolocError, IndexRefusedError
from service.jobs.indexes import GallerySpec, add_reference_images, build_index
from service.jobs.references import EncoderSpec, ShardEncoder, prepare_job
from service.jobs.setup import run_setup, served_version
from service.jobs.training import write_bluemarble_set

GALLERY = "default-bluemarble"
REFS = "refs-bluemarble"


@pytest.fixture(scope="module")
def bundled() -> GeoModel:
    return load_model("bluemarble")


@pytest.fixture(scope="module")
def checkpoint(bundled: GeoModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with every weight moved a little: what a retrained release ships
    (same profile name, same output dimension)."""
    model = copy.deepcopy(bundled)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("weights") / "retrained.pt"
    save_checkpoint(model, path, config=get_profile("bluemarble").to_dict())
    return path


@pytest.fixture(scope="module")
def retrained(checkpoint: Path) -> GeoModel:
    return load_model("bluemarble", checkpoint=checkpoint)


def _tiles(out: Path, n: int, seed: int) -> Path:
    return write_bluemarble_set(out, n, seed=seed, kind="reference", progress=False)


def test_weights_id_names_the_weights_file_the_model_was_loaded_from(
    bundled: GeoModel, retrained: GeoModel, checkpoint: Path
) -> None:
    assert bundled.weights_id == sha256_file(WEIGHTS_DIR / "bluemarble.pt")[:16]
    assert retrained.weights_id == sha256_file(checkpoint)[:16] != bundled.weights_id
    # The same identity without building the model (what `geoloc setup` checks first).
    assert weights_id("bluemarble") == bundled.weights_id
    assert weights_id("bluemarble", checkpoint=checkpoint) == retrained.weights_id
    assert build_model(get_profile("bluemarble")).weights_id == RANDOM_WEIGHTS


def test_a_gallery_built_with_other_weights_is_refused(
    tmp_path: Path, bundled: GeoModel, retrained: GeoModel
) -> None:
    s = Settings(data_dir=tmp_path)
    m = build_index(s, GALLERY, GallerySpec("h3", 0), model=retrained, progress=False)
    assert m.weights == retrained.weights_id
    assert (
        json.loads((s.index_dir / "indexes" / GALLERY / m.version / "manifest.json").read_text())[
            "extra"
        ]["weights"]
        == retrained.weights_id
    )
    with pytest.raises(IndexWeightsError) as err:
        load_locator(s, model=bundled)
    msg = str(err.value)
    assert f"{GALLERY}/{m.version} was built with model weights {retrained.weights_id}" in msg
    assert bundled.weights_id in msg and f"`geoloc index build {GALLERY}`" in msg
    assert load_locator(s, model=retrained).index.manifest.version == m.version


def test_an_index_from_before_weights_were_recorded_loads_with_a_warning(
    tmp_path: Path, bundled: GeoModel, caplog: pytest.LogCaptureFixture
) -> None:
    s = Settings(data_dir=tmp_path)
    m = build_index(s, GALLERY, GallerySpec("h3", 0), model=bundled, progress=False)
    manifest = s.index_dir / "indexes" / GALLERY / m.version / "manifest.json"
    old = json.loads(manifest.read_text())
    del old["extra"]["weights"]  # the manifest as geoloc wrote it before
    os.chmod(manifest, 0o644)
    manifest.write_text(json.dumps(old))
    with caplog.at_level("WARNING"):
        loc = load_locator(s, model=bundled)
    assert loc.index.manifest.weights is None and len(loc.index) == m.count
    assert [r.message for r in caplog.records if "records no model weights" in r.message]


def test_reference_indexes_record_weights_and_never_mix_them(
    tmp_path: Path, bundled: GeoModel, retrained: GeoModel
) -> None:
    s = Settings(data_dir=tmp_path / "data")
    build_index(s, GALLERY, GallerySpec("h3", 0), model=bundled, progress=False)
    first = _tiles(tmp_path / "a", 6, seed=1)
    old = add_reference_images(s, first, model=retrained, progress=False)
    assert old.manifest.weights == retrained.weights_id and old.manifest.count == 6
    with pytest.raises(IndexWeightsError, match=rf"`geoloc images add TABLE --name {REFS}`"):
        load_locator(s, model=bundled)

    # Adding with the bundled model starts from its own images only: the retrained model's
    # vectors would match nothing it embeds. The old version stays on disk.
    new = add_reference_images(s, _tiles(tmp_path / "b", 4, seed=2), model=bundled, progress=False)
    assert new.manifest.weights == bundled.weights_id and new.manifest.count == 4
    assert f"the 6 images of {REFS}/{old.manifest.version} are not in the new version" in (
        new.left_out
    )
    assert len(list_indexes(s.index_dir, REFS)) == 2
    loc = load_locator(s, model=bundled)
    assert loc.neighbours is not None and len(loc.neighbours) == 4

    # The first table again, now with the bundled weights: a job of its own (the weights are
    # part of the job's key), added to the bundled version.
    again = add_reference_images(s, first, model=bundled, progress=False)
    assert not again.already_published and again.manifest.count == 10 and not again.left_out


def test_an_encoder_with_other_weights_refuses_to_embed_for_the_job(
    tmp_path: Path, bundled: GeoModel, retrained: GeoModel
) -> None:
    table = _tiles(tmp_path / "t", 3, seed=3)

    def job(weights: str) -> Path:
        j, _ = prepare_job(
            tmp_path / "jobs",
            table,
            index_name=REFS,
            profile="bluemarble",
            checkpoint=None,
            weights=weights,
            shard_rows=3,
        )
        return j.dir

    assert job(bundled.weights_id) != job(retrained.weights_id)
    spec = EncoderSpec(
        profile="bluemarble",
        checkpoint=None,
        backbone_checkpoint=None,
        device="cpu",
        batch_size=4,
        limits=ImageLimits(1 << 20, 1 << 20),
        weights_id=bundled.weights_id,
    )
    # What a Ray worker of another release (or checkpoint) would do: refuse, not embed.
    with pytest.raises(GeolocError, match=f"with weights {retrained.weights_id}"):
        ShardEncoder(spec, str(job(bundled.weights_id)), model=retrained)
    ShardEncoder(spec, str(job(bundled.weights_id)), model=bundled).encode_shard(0)


def _calibration(version: str, weights: str) -> Calibration:
    return Calibration(
        temperature=2.0,
        within_km=750.0,
        version=version,
        created_at="2024-01-01T00:00:00+00:00",
        index=f"{GALLERY}/v1",
        profile="bluemarble",
        weights=weights,
        data={},
        options={},
        fit={},
    )


def test_a_calibration_for_other_bundled_weights_is_refused(
    tmp_path: Path, bundled: GeoModel, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    label = weights_label(None, bundled.weights_id)
    assert label == f"bundled:{bundled.weights_id}"
    assert weights_label(checkpoint, "ab12") == f"{checkpoint.resolve()}:ab12"

    def load() -> Calibration | None:
        return load_calibration(
            tmp_path, GALLERY, "v1", "latest", profile="bluemarble", weights=label
        )

    save_calibration(tmp_path, _calibration("20240101-000000-000001", label))
    assert load() is not None and load().version == "20240101-000000-000001"
    # Fitted for the previous bundled weights: refused by the mismatch check.
    save_calibration(tmp_path, _calibration("20240101-000000-000002", "bundled:0123456789abcdef"))
    with pytest.raises(CalibrationError, match="fitted for profile 'bluemarble' with weights"):
        load()
    # Written before weights identities ("bundled" alone): kept, with a warning.
    save_calibration(tmp_path, _calibration("20240101-000000-000003", "bundled"))
    with caplog.at_level("WARNING"):
        assert load().version == "20240101-000000-000003"
    assert [r for r in caplog.records if "without their identity" in r.message]


def test_setup_builds_new_versions_beside_indexes_of_other_weights(
    tmp_path: Path, bundled: GeoModel, retrained: GeoModel, checkpoint: Path
) -> None:
    data = tmp_path / "data"
    s = Settings(
        data_dir=data,
        default_res=0,
        setup_reference_tiles=8,
        setup_calibration_tiles=24,
        calibration_negatives=0,
    )
    # A data dir set up with the retrained weights, its gallery activated in the database.
    retrained_s = s.model_copy(update={"checkpoint": checkpoint})
    old_gallery = build_index(
        retrained_s, GALLERY, GallerySpec("h3", 0), model=retrained, progress=False
    )
    old_refs = add_reference_images(
        retrained_s, _tiles(tmp_path / "r", 5, seed=4), model=retrained, progress=False
    ).manifest
    upgrade(s.db_url)
    engine = make_engine(s.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            sync_index_versions(session, s.index_dir)
            activate_index(session, GALLERY, old_gallery.version)
    finally:
        engine.dispose()

    lines = run_setup(s, echo=lambda _: None, progress=False)
    gallery_line, refs_line, cal_line = lines[1], lines[2], lines[3]
    galleries = list_indexes(data, GALLERY)
    refs = list_indexes(data, REFS)
    (kept_gallery, new_gallery), (kept_refs, new_refs) = galleries, refs  # nothing deleted
    assert (kept_gallery.version, kept_refs.version) == (old_gallery.version, old_refs.version)
    assert new_gallery.weights == new_refs.weights == bundled.weights_id
    assert new_refs.count == 8  # the tiles only, not the retrained model's 5 images
    assert f"built {GALLERY}/{new_gallery.version}" in gallery_line
    assert f"{GALLERY}/{old_gallery.version} was built with other model weights" in gallery_line
    assert "activated in its place" in gallery_line
    assert f"built {REFS}/{new_refs.version}" in refs_line
    assert "its 5 images are not in the new version" in refs_line
    assert served_version(s, GALLERY) == new_gallery.version
    (cal,) = list_calibrations(data, GALLERY, new_gallery.version)
    assert cal.weights == f"bundled:{bundled.weights_id}" and "temperature" in cal_line

    loc = load_locator(s, model=bundled)
    assert loc.index.manifest.version == new_gallery.version and loc.calibration == cal
    assert loc.neighbours is not None and loc.neighbours.manifest.version == new_refs.version
    assert len(loc.neighbours) == 8

    again = run_setup(s, echo=lambda _: None, progress=False)
    assert "exists" in again[1] and "exists" in again[2] and "has calibration" in again[3]
    assert len(list_indexes(data)) == 4


def test_setup_rebuilds_a_gallery_that_records_no_weights(
    tmp_path: Path, bundled: GeoModel
) -> None:
    """Built before weights were recorded: the service loads it (with a warning), but which
    weights made it is unknown, so `geoloc setup` builds a version it can vouch for."""
    s = Settings(
        data_dir=tmp_path, default_res=0, setup_reference_tiles=0, setup_calibration_tiles=0
    )
    old = build_index(s, GALLERY, GallerySpec("h3", 0), model=bundled, progress=False)
    manifest = tmp_path / "indexes" / GALLERY / old.version / "manifest.json"
    raw = json.loads(manifest.read_text())
    del raw["extra"]["weights"]
    os.chmod(manifest, 0o644)
    manifest.write_text(json.dumps(raw))

    lines = run_setup(s, echo=lambda _: None, progress=False)
    assert f"{GALLERY}/{old.version} records no model weights" in lines[1], lines
    kept, new = list_indexes(tmp_path, GALLERY)
    assert kept.version == old.version and kept.weights is None
    assert new.weights == bundled.weights_id
    assert load_locator(s, model=bundled).index.manifest.version == new.version


def test_a_replica_refuses_to_swap_to_or_activate_a_version_of_other_weights(
    tmp_path: Path, bundled: GeoModel, retrained: GeoModel, caplog: pytest.LogCaptureFixture
) -> None:
    from service.api import operations
    from service.api.runtime import build_state

    s = Settings(data_dir=tmp_path)
    good = build_index(s, GALLERY, GallerySpec("h3", 0), model=bundled, progress=False)
    other = build_index(s, GALLERY, GallerySpec("h3", 0), model=retrained, progress=False)
    upgrade(s.db_url)
    state = build_state(s)
    state.engine = make_engine(s.db_url)
    try:
        state.sessions = make_sessionmaker(state.engine)
        state.db_error = None
        state.locator = load_locator(s, model=bundled, index_version=good.version)
        with state.sessions() as session:
            # The admin API refuses it for the served index...
            with pytest.raises(IndexRefusedError, match="was built with model weights"):
                operations.activate_index(state, session, GALLERY, other.version)
            # ...and a replica whose database names it anyway keeps serving the old version.
            sync_index_versions(session, s.index_dir)
            activate_index(session, GALLERY, other.version)
        with caplog.at_level("ERROR"):
            state.refresh_index()
        assert state.locator.index.manifest.version == good.version
        assert f"cannot load index {GALLERY}/{other.version}" in caplog.text
        assert "was built with model weights" in caplog.text
    finally:
        state.engine.dispose()


def test_a_portable_int8_tower_is_exported_within_7_bits_on_a_cpu_with_vnni(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GEOLOC_IMAGE_INT8_PORTABLE reaches the export the service makes on first start."""
    import encoders.runtime as runtime
    from service.engine.loading import load_geomodel

    monkeypatch.setattr(runtime, "has_vnni", lambda: True)
    base = {"data_dir": tmp_path, "image_runtime": "onnx", "image_precision": "int8"}
    manifest = runtime.artifact_dir(tmp_path / "runtimes", "bluemarble", "onnx", "int8")
    load_geomodel(Settings(**base))
    assert runtime.read_manifest(manifest).quantization == runtime.INT8_8BIT
    load_geomodel(Settings(**base, image_int8_portable=True))
    assert runtime.read_manifest(manifest).quantization == runtime.INT8_7BIT


def test_the_settings_offer_every_runtime_and_precision_the_encoders_have() -> None:
    """Settings declare their choices without importing the encoders (light commands start at
    once); this keeps the two lists the same."""
    import typing

    from encoders.runtime import PRECISIONS, RUNTIMES

    fields = Settings.model_fields
    assert typing.get_args(fields["image_precision"].annotation) == PRECISIONS
    assert typing.get_args(fields["image_runtime"].annotation) == RUNTIMES


@pytest.mark.parametrize("precision", ["int8-residual", "int8-fp32"])
def test_int8_parts_are_a_setting_the_service_loads_and_need_onnx(
    tmp_path: Path, precision: str
) -> None:
    import encoders.runtime as runtime
    from encoders.quantize import INT8_FP32, INT8_RESIDUAL
    from service.engine.loading import load_geomodel

    recipe = {"int8-residual": INT8_RESIDUAL, "int8-fp32": INT8_FP32}[precision]

    with pytest.raises(ValueError, match=f"{precision} needs image_runtime onnx"):
        Settings(data_dir=tmp_path, image_precision=precision)
    s = Settings(data_dir=tmp_path, image_runtime="onnx", image_precision=precision)
    model = load_geomodel(s)
    assert model.image_runtime is not None
    assert model.image_runtime.describe()["precision"] == precision
    directory = runtime.artifact_dir(tmp_path / "runtimes", "bluemarble", "onnx", precision)
    assert runtime.read_manifest(directory).quantization == recipe
