"""Load what the service runs: the model, the Locator with its indexes and calibration, and
the check of an index version before it is activated. Heavy things load once, here; the HTTP
app's lifespan and the CLI call these. (Building indexes is a job: service/jobs/indexes.py.)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from encoders import GeoModel, load_model
from encoders.model import resolve_device
from encoders.runtime import load_image_runtime
from index.geocode import ReverseGeocoder
from index.store import (
    IndexStoreError,
    LoadedIndex,
    list_indexes,
    load_index,
)
from service.engine.calibration import Calibration, load_calibration, weights_label
from service.engine.locator import Locator
from service.errors import IndexRefusedError

if TYPE_CHECKING:
    from service.config import Settings


def set_torch_threads(settings: Settings) -> None:
    """Apply ``GEOLOC_TORCH_THREADS`` (0: torch's default, one thread per core) to torch's
    intra-op and, while it can still be set, inter-op pools."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
        with contextlib.suppress(RuntimeError):  # only before the first parallel work
            torch.set_num_interop_threads(settings.torch_threads)


def load_geomodel(
    settings: Settings,
    profile: str | None = None,
    random_backbone: bool = False,
    *,
    image_runtime: bool = True,
) -> GeoModel:
    """The profile's model with its weights; its image tower runs in GEOLOC_IMAGE_RUNTIME
    (exported on first use) unless ``image_runtime`` is False (training needs torch's)."""
    set_torch_threads(settings)
    model = load_model(
        profile or settings.profile,
        checkpoint=settings.checkpoint,
        backbone_checkpoint=settings.backbone_checkpoint,
        random_backbone=random_backbone,
        device=resolve_device(settings.device),
    )
    if image_runtime:
        load_image_runtime(
            model,
            settings.runtimes_dir,
            settings.image_runtime,
            settings.image_precision,
            portable=settings.image_int8_portable,
        )
    return model


def load_locator(
    settings: Settings,
    *,
    model: GeoModel | None = None,
    index_name: str | None = None,
    index_version: str | None = None,
) -> Locator:
    """Load model (unless given), indexes and geocoder once; check they belong together:
    profile, dimension and the weights that made the vectors (IndexWeightsError)."""
    model = model or load_geomodel(settings)
    index = load_index(
        settings.index_dir,
        index_name or settings.default_index,
        index_version or settings.index_version or None,
        profile=model.profile,
        dim=model.embed_dim,
        weights=model.weights_id,
    )
    refs_name = settings.reference_index or f"refs-{model.profile}"
    neighbours = None
    if any(m.name == refs_name for m in list_indexes(settings.index_dir)):
        neighbours = load_index(
            settings.index_dir,
            refs_name,
            profile=model.profile,
            dim=model.embed_dim,
            weights=model.weights_id,
        )
    elif settings.reference_index:
        raise IndexStoreError(
            f"reference index '{refs_name}' does not exist; "
            "create it with `geoloc images add DATA.csv`"
        )
    return Locator(
        model,
        index,
        ReverseGeocoder(),
        neighbours=neighbours,
        calibration=calibration_for(settings, index, model),
        abstain_below=settings.abstain_below,
    )


def calibration_for(settings: Settings, index: LoadedIndex, model: GeoModel) -> Calibration | None:
    """The calibration GEOLOC_CALIBRATION names for this index version (None: uncalibrated)."""
    m = index.manifest
    return load_calibration(
        settings.data_dir,
        m.name,
        m.version,
        settings.calibration,
        profile=model.profile,
        weights=weights_label(settings.checkpoint, model.weights_id),
    )


def verify_published(
    settings: Settings, name: str, version: str, *, weights: str | None = None
) -> None:
    """Check a version's files against its manifest before it is activated (IndexRefusedError),
    so that a corrupt build is refused once, here, not by every replica. A version that is not
    on this host is left to the database, which knows whether it exists. ``weights``: the
    served model's weights identity, when known: a version built with others is refused."""
    try:
        if any(m.version == version for m in list_indexes(settings.index_dir, name)):
            load_index(settings.index_dir, name, version, weights=weights, verify=True)
    except IndexStoreError as exc:
        raise IndexRefusedError(str(exc)) from None
