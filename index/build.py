"""Publication of an index: checks, a build in a temporary directory, the manifest, and
the atomic rename that makes the version visible. Galleries too large to hold at once are
published by ``index.chunked``."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.faiss_helpers import ADD_CHUNK, make_index, train_index
from index.files import atomic_write, fsync_dir, fsync_file, sha256_file
from index.manifest import (
    COLOUR_FILE,
    COUNTRY_FILE,
    DATA_FILES,
    GALLERY_KINDS,
    IDS_FILE,
    INDEX_FILE,
    LATLON_FILE,
    MANIFEST_FILE,
    METRIC,
    STRUCTURE_FILE,
    WIDTH_FILE,
    IndexStoreError,
    Manifest,
    check_name,
    indexes_dir,
    new_version,
)
from index.points import PointTable, check_points, check_vectors

__all__ = ["check_publication", "finish_publication", "publish_index", "save_npy"]


def save_npy(path: Path, arr: np.ndarray) -> None:
    """Write ``arr`` as a .npy file (no pickles), durably."""
    atomic_write(path, lambda fh: np.save(fh, arr, allow_pickle=False))


def check_publication(
    root: Path,
    name: str,
    version: str | None,
    *,
    profile: str,
    gallery_kind: str,
    h3_resolution: int | None,
    extra: dict | None,
) -> tuple[Path, str, dict]:
    """Checks shared by both ways to publish: (the version's final directory, the version,
    the extra metadata). Nothing is written."""
    check_name(name, "name")
    version = new_version() if version is None else version
    check_name(version, "version")
    if gallery_kind not in GALLERY_KINDS:
        raise IndexStoreError(f"unknown gallery_kind {gallery_kind!r}; use one of {GALLERY_KINDS}")
    if gallery_kind == "h3" and h3_resolution is None:
        raise IndexStoreError("gallery_kind 'h3' needs h3_resolution (0-15)")
    if h3_resolution is not None and not 0 <= int(h3_resolution) <= 15:
        raise IndexStoreError(f"h3_resolution must be in 0..15, got {h3_resolution}")
    if not profile:
        raise IndexStoreError("profile is required: name the model profile that made the vectors")
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except TypeError as exc:
        raise IndexStoreError(f"extra metadata must be JSON-serialisable: {exc}") from exc
    final_dir = indexes_dir(root) / name / version
    if final_dir.exists():
        raise IndexStoreError(
            f"index {name!r} version {version!r} already exists at {final_dir}; "
            "published versions are immutable: pick a new version (or omit it for a timestamp)"
        )
    return final_dir, version, extra


def publish_index(
    root: Path,
    name: str,
    vectors: np.ndarray,
    points: PointTable,
    *,
    profile: str,
    gallery_kind: str,
    h3_resolution: int | None,
    factory: str = "Flat",
    version: str | None = None,
    extra: dict | None = None,
    train_size: int = 100_000,
    seed: int = 0,
) -> Manifest:
    """Build a FAISS inner-product index over unit ``vectors`` and publish it atomically."""
    t0 = time.perf_counter()
    final_dir, version, extra = check_publication(
        root,
        name,
        version,
        profile=profile,
        gallery_kind=gallery_kind,
        h3_resolution=h3_resolution,
        extra=extra,
    )
    if train_size < 1:
        raise IndexStoreError(f"train_size must be >= 1, got {train_size}")
    vecs = check_vectors(vectors)
    n, dim = vecs.shape
    table = check_points(points, n)
    name_dir = final_dir.parent

    index = make_index(dim, factory)
    # Train on a seeded sample so that a rebuild from the same vectors is reproducible.
    rng = np.random.default_rng(seed)
    sample = vecs
    if n > train_size:
        sample = vecs[np.sort(rng.choice(n, size=train_size, replace=False))]
    train_index(index, sample, factory)
    for start in range(0, n, ADD_CHUNK):
        index.add(vecs[start : start + ADD_CHUNK])
    if index.ntotal != n:  # e.g. a factory that deduplicates; row alignment would break
        raise IndexStoreError(f"FAISS index holds {index.ntotal} vectors, expected {n}")

    name_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = name_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        faiss.write_index(index, str(tmp_dir / INDEX_FILE))
        fsync_file(tmp_dir / INDEX_FILE)
        save_npy(tmp_dir / IDS_FILE, table.ids)
        save_npy(tmp_dir / LATLON_FILE, table.latlon)
        save_npy(tmp_dir / COUNTRY_FILE, table.country)
        if table.structure is not None:
            save_npy(tmp_dir / STRUCTURE_FILE, table.structure)
        if table.width is not None:
            save_npy(tmp_dir / WIDTH_FILE, table.width)
        if table.colour is not None:
            save_npy(tmp_dir / COLOUR_FILE, table.colour)
        extra.setdefault("faiss_version", faiss.__version__)
        extra.setdefault("build_seconds", round(time.perf_counter() - t0, 3))
        manifest = finish_publication(
            tmp_dir,
            final_dir,
            profile=profile,
            dim=dim,
            factory=factory,
            gallery_kind=gallery_kind,
            h3_resolution=h3_resolution,
            count=n,
            files=(
                *DATA_FILES,
                *((STRUCTURE_FILE,) if table.structure is not None else ()),
                *((WIDTH_FILE,) if table.width is not None else ()),
                *((COLOUR_FILE,) if table.colour is not None else ()),
            ),
            extra=extra,
        )
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def finish_publication(
    tmp_dir: Path,
    final_dir: Path,
    *,
    profile: str,
    dim: int,
    factory: str,
    gallery_kind: str,
    h3_resolution: int | None,
    count: int,
    files: tuple[str, ...],
    extra: dict[str, Any],
) -> Manifest:
    """Write the manifest (checksums of ``files``) into a filled temporary directory and
    rename the directory into place as ``final_dir`` (<name>/<version>)."""
    manifest = Manifest(
        name=final_dir.parent.name,
        version=final_dir.name,
        profile=profile,
        dim=int(dim),
        metric=METRIC,
        factory=factory,
        gallery_kind=gallery_kind,
        h3_resolution=None if h3_resolution is None else int(h3_resolution),
        count=int(count),
        files={f: sha256_file(tmp_dir / f) for f in files},
        created_at=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        extra=extra,
    )
    # The manifest goes last: its presence is what marks a version directory as complete.
    atomic_write(tmp_dir / MANIFEST_FILE, manifest.to_json().encode("utf-8"))
    if final_dir.exists():  # lost a race with another publisher of the same version
        raise IndexStoreError(
            f"index {manifest.name!r} version {manifest.version!r} was published meanwhile"
        )
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    fsync_dir(final_dir.parent.parent)
    return manifest
