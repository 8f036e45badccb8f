"""What is served, without HTTP: the model and index (/v1/info), readiness (/readyz) and the
activation of an index version (/v1/admin/index/activate)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from encoders import get_profile
from index.store import LoadedIndex
from service import db
from service.api.problems import NotReadyError
from service.api.runtime import ServiceState
from service.api.schemas import (
    ActivateOut,
    CalibrationInfo,
    ImageRuntimeInfo,
    IndexInfo,
    InfoOut,
    LimitsInfo,
    LocalizabilityInfo,
    ProfileInfo,
    ReadyOut,
)
from service.config import Settings
from service.engine.loading import verify_published
from service.engine.locator import Locator


def _index_info(index: LoadedIndex) -> IndexInfo:
    m = index.manifest
    return IndexInfo(
        name=m.name,
        version=m.version,
        count=m.count,
        gallery_kind=m.gallery_kind,
        h3_resolution=m.h3_resolution,
        factory=m.factory,
        created_at=m.created_at,
        nprobe=index.nprobe,
        rerank_k=index.rerank_k,
        recall_at_10=m.extra.get("recall_at_10"),
    )


def service_info(s: Settings, loc: Locator) -> InfoOut:
    p = get_profile(loc.model.profile)
    return InfoOut(
        profile=ProfileInfo(
            name=p.name,
            description=p.description,
            purpose=p.purpose,
            embedding_dim=loc.model.embed_dim,
            image_runtime=_runtime_info(loc),
        ),
        index=_index_info(loc.index),
        reference_index=_index_info(loc.neighbours) if loc.neighbours is not None else None,
        limits=LimitsInfo(
            max_image_bytes=s.max_image_bytes,
            max_image_pixels=s.max_image_pixels,
            max_image_aspect=s.max_image_aspect,
            max_jpeg_scans=s.max_jpeg_scans,
            max_request_bytes=s.max_request_bytes,
            max_batch=s.max_batch,
            max_album=s.max_album,
            max_top_k=s.max_top_k,
            rate_limit_per_minute=s.rate_limit_per_minute,
            request_timeout_s=s.request_timeout_s,
        ),
        auth_enabled=s.auth_enabled,
        url_fetch_enabled=s.url_fetch_enabled,
        batching_enabled=s.batching_enabled,
        calibration=None
        if loc.calibration is None
        else CalibrationInfo(
            version=loc.calibration.version,
            temperature=loc.calibration.temperature,
            within_km=loc.calibration.within_km,
            created_at=loc.calibration.created_at,
            data=loc.calibration.data,
        ),
        localizability=_localizability_info(loc),
    )


def _runtime_info(loc: Locator) -> ImageRuntimeInfo:
    runtime = loc.model.image_runtime
    described = getattr(runtime, "describe", None)
    if described is None:
        return ImageRuntimeInfo(runtime="torch", precision="fp32")
    return ImageRuntimeInfo(**described())


def _localizability_info(loc: Locator) -> LocalizabilityInfo | None:
    judge, cal, below = loc.judge, loc.calibration, loc.abstain_threshold
    if judge is None or cal is None or below is None:
        return None
    summary = judge.summary()
    return LocalizabilityInfo(
        version=cal.version,
        created_at=cal.created_at,
        abstain_below=below,
        leave_one_kind_out=judge.fit.get("leave_one_kind_out") or None,
        **summary,
    )


def readiness(state: ServiceState) -> ReadyOut:
    """200 when model, index and database (at head) are usable; else a 503 naming the parts."""
    loc = state.locator
    checks: dict[str, Any] = {
        "model": "ok" if loc is not None or state.model_loaded else str(state.locator_error),
        "index": "ok" if loc is not None else str(state.locator_error),
        "database": "ok" if state.db_error is None else state.db_error,
        "shutdown": "draining: finishing in-flight requests" if state.draining else "ok",
    }
    failed = [k for k, v in checks.items() if v != "ok"]
    if failed or loc is None:
        raise NotReadyError(
            "not ready: " + "; ".join(f"{k}: {checks[k]}" for k in failed),
            headers={"Retry-After": "5"},
            extensions={"checks": checks},
        )
    return ReadyOut(status="ready", checks=checks, index_version=loc.index_label)


def activate_index(state: ServiceState, session: Session, name: str, version: str) -> ActivateOut:
    """Make name/version the active version (every replica swaps to it at its next poll).
    A version of the served index built with other weights than the served model's is refused
    here, not only by each replica's swap."""
    loc = state.locator
    weights = loc.model.weights_id if loc is not None and loc.index.manifest.name == name else None
    verify_published(state.settings, name, version, weights=weights)
    db.sync_index_versions(session, state.settings.index_dir)
    row = db.activate_index(session, name, version)
    state.poke()
    return ActivateOut(
        name=row.name,
        version=row.version,
        profile=row.profile,
        gallery_kind=row.gallery_kind,
        count=row.count,
        active=True,
    )
