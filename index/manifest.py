"""The on-disk layout of published indexes, their manifests and their discovery (no faiss).

Layout: ``<root>/indexes/<name>/<version>/`` holds ``index.faiss``, the id->point table
(``ids.npy``, ``latlon.npy``, ``country.npy``, row-aligned with the FAISS index: the FAISS
label of a vector is its row number) and ``manifest.json``, which is written last; a
compressed index adds its inverted lists (``index.ivfdata``) and, to re-rank, its vectors
as float16 (``vectors.f16.npy``). A version directory only ever appears by an atomic rename
of a finished temporary directory, so readers never see a half-written index.

Everything a command needs that only lists or inspects indexes is here, and none of it
imports faiss: building is ``index.build``/``index.chunked``, loading ``index.search``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "COUNTRY_FILE",
    "DATA_FILES",
    "EXACT_FILE",
    "IDS_FILE",
    "INDEX_FILE",
    "LATLON_FILE",
    "MANIFEST_FILE",
    "ONDISK_FILE",
    "STRUCTURE_FILE",
    "WEIGHTS_KEY",
    "IndexStoreError",
    "IndexWeightsError",
    "Manifest",
    "check_name",
    "check_weights",
    "indexes_dir",
    "latest_version",
    "list_indexes",
    "new_version",
    "read_manifest",
    "remove_unfinished",
]

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
LATLON_FILE = "latlon.npy"
COUNTRY_FILE = "country.npy"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (INDEX_FILE, IDS_FILE, LATLON_FILE, COUNTRY_FILE)
#: Optional: row-aligned int8 structure descriptors of reference images
#: (``encoders.structure``), which verification compares with the query's.
STRUCTURE_FILE = "structure.npy"
#: Optional: row-aligned float32 km of ground each reference image shows (nan: unknown),
#: which sets how sharply verification trusts that image's location.
WIDTH_FILE = "width.npy"
#: Optional: row-aligned uint8 colour thumbnails of reference images
#: (``encoders.structure.colour_thumbnails``), which verification compares with the query's.
COLOUR_FILE = "colour.npy"
#: Inverted lists of a compressed index live in this file beside ``index.faiss``.
ONDISK_FILE = "index.ivfdata"
#: Row-aligned float16 copies of a compressed index's vectors, read from disk a few rows at a
#: time to re-score its best candidates exactly (codes alone cap recall; see ``rerank_k``).
EXACT_FILE = "vectors.f16.npy"

GALLERY_KINDS = ("h3", "csv", "images")
METRIC = "ip"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: The manifest ``extra`` entry naming the model weights that made the vectors (the model's
#: ``weights_id``). Manifests written before it existed lack it: their weights are unknown.
WEIGHTS_KEY = "weights"

# The logger's name from before index.store was split up: log configurations name it.
log = logging.getLogger("index.store")


class IndexStoreError(ValueError):
    """A refused index operation; the message says what to do about it."""


class IndexWeightsError(IndexStoreError):
    """An index whose vectors were made by other weights than the model's."""


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    profile: str
    dim: int
    metric: str
    factory: str
    gallery_kind: str
    h3_resolution: int | None
    count: int
    files: dict[str, str]
    created_at: str
    extra: dict[str, Any]

    @property
    def label(self) -> str:
        """ "name/version", as answers, calibrations and messages name an index version."""
        return f"{self.name}/{self.version}"

    @property
    def weights(self) -> str | None:
        """The weights that made the vectors (``WEIGHTS_KEY``); None: not recorded."""
        value = self.extra.get(WEIGHTS_KEY)
        return str(value) if value else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            h3_res = d["h3_resolution"]
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                profile=str(d["profile"]),
                dim=int(d["dim"]),
                metric=str(d["metric"]),
                factory=str(d["factory"]),
                gallery_kind=str(d["gallery_kind"]),
                h3_resolution=None if h3_res is None else int(h3_res),
                count=int(d["count"]),
                files={str(k): str(v) for k, v in dict(d["files"]).items()},
                created_at=str(d["created_at"]),
                extra=dict(d.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexStoreError(
                f"invalid index manifest ({type(exc).__name__}: {exc}); "
                "rebuild the index with `geoloc index build`"
            ) from exc


def check_name(value: str, what: str) -> None:
    """Refuse an index name or version (``what``) that is not a safe directory name."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise IndexStoreError(
            f"invalid index {what} {value!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit (e.g. 'h3-res5' or '20240101-120000-000000')"
        )


def new_version() -> str:
    """A version name that sorts by creation time (UTC, microseconds)."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


def indexes_dir(root: Path) -> Path:
    """The directory that holds one directory per index name."""
    return Path(root) / "indexes"


# ---------------------------------------------------------------------------------------------
# discovery


def read_manifest(version_dir: Path) -> Manifest:
    """The manifest of a version directory, or IndexStoreError."""
    path = version_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexStoreError(
            f"cannot read {path}: {exc}; rebuild the index with `geoloc index build`"
        ) from exc
    if not isinstance(data, dict):
        raise IndexStoreError(f"{path} is not a JSON object; rebuild with `geoloc index build`")
    return Manifest.from_dict(data)


def _version_dirs(name_dir: Path) -> list[Path]:
    # Temp dirs start with "." and lack a final manifest until renamed: never list them.
    if not name_dir.is_dir():
        return []
    return [
        d
        for d in name_dir.iterdir()
        if d.is_dir() and not d.name.startswith(".") and (d / MANIFEST_FILE).is_file()
    ]


def remove_unfinished(root: Path, name: str) -> list[Path]:
    """Delete the temporary directories that builds of ``name`` left behind (a build that was
    killed never reaches its rename). Only safe while holding the build lock of ``name``:
    a running build's own temporary directory looks the same."""
    check_name(name, "name")
    name_dir = indexes_dir(root) / name
    stale = sorted(name_dir.glob(".tmp-*")) if name_dir.is_dir() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def list_indexes(root: Path, name: str | None = None) -> list[Manifest]:
    """Every complete published index (optionally of one name), sorted by (name, version)."""
    base = indexes_dir(root)
    if name is not None:
        check_name(name, "name")
        name_dirs = [base / name]
    elif base.is_dir():
        name_dirs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    else:
        name_dirs = []
    manifests = [read_manifest(v) for d in name_dirs for v in _version_dirs(d)]
    return sorted(manifests, key=lambda m: (m.name, m.version))


def latest_version(root: Path, name: str) -> str:
    """The most recently published version of ``name`` (by created_at, then version)."""
    manifests = list_indexes(root, name)
    if not manifests:
        known = sorted({m.name for m in list_indexes(root)})
        raise IndexStoreError(
            f"no published index named {name!r} under {indexes_dir(root)}; "
            f"known: {known or 'none'}; build one with `geoloc index build`"
        )
    return max(manifests, key=lambda m: (m.created_at, m.version)).version


def check_weights(manifest: Manifest, weights: str) -> None:
    """Refuse an index built with other model weights than ``weights`` (IndexWeightsError):
    same profile and dimension, but its vectors come from another model, so every answer
    would be wrong without any error. An index that records no weights only gets a warning,
    so that indexes published before weights were recorded keep serving."""
    m = manifest
    if m.weights is None:
        log.warning(
            "index %s/%s records no model weights (published before they were recorded): "
            "cannot check it was built with these weights (%s); rebuild it to have it checked",
            m.name,
            m.version,
            weights,
        )
        return
    if m.weights == weights:
        return
    if m.gallery_kind == "images":
        fix = (
            f"`geoloc images add TABLE --name {m.name}` for each table it held (the first "
            "starts a new version without the old images)"
        )
    else:
        fix = (
            f"`geoloc index build {m.name}` with the options it was built with (a new version; "
            "`geoloc index activate` it where versions are activated)"
        )
    raise IndexWeightsError(
        f"index {m.name}/{m.version} was built with model weights {m.weights}, but the model "
        f"has weights {weights} (profile {m.profile}): its vectors come from another model. "
        f"Rebuild it with these weights: {fix}; `geoloc setup` does this for the default "
        "indexes (it builds new versions and deletes nothing)"
    )
