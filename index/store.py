"""FAISS index storage: build, atomic publication, checksummed mmap loading and search.

Layout: ``<root>/indexes/<name>/<version>/`` holds ``index.faiss``, the id->point table
(``ids.npy``, ``latlon.npy``, ``country.npy``, row-aligned with the FAISS index: the FAISS
label of a vector is its row number) and ``manifest.json``, which is written last; a
compressed index adds its inverted lists (``index.ivfdata``) and, to re-rank, its vectors
as float16 (``vectors.f16.npy``). A version directory only ever appears by an atomic rename
of a finished temporary directory, so readers never see a half-written index.

This is the only module that builds or loads FAISS indexes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

__all__ = [
    "WEIGHTS_KEY",
    "ExactVectors",
    "IndexStoreError",
    "IndexWeightsError",
    "LoadedIndex",
    "Manifest",
    "PointTable",
    "VectorChunk",
    "check_weights",
    "compressed_factory",
    "exact_top_k",
    "gpu_count",
    "latest_version",
    "list_indexes",
    "load_index",
    "publish_index",
    "publish_index_chunked",
    "recall_1_at_k",
    "remove_unfinished",
    "select_device",
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

GALLERY_KINDS = ("h3", "csv", "images")
METRIC = "ip"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_COUNTRY_RE = re.compile(r"^([A-Z]{2})?$")
_ADD_CHUNK = 65_536
# Stored vectors must be unit norm (scores are cosines); allow float32 round-off and fp16 sources.
_NORM_TOL = 1e-2
_FACTORY_EXAMPLES = '"Flat" (exact), "HNSW32" (graph), "IVF1024,PQ64" (compressed)'
#: The manifest ``extra`` entry naming the model weights that made the vectors (the model's
#: ``weights_id``). Manifests written before it existed lack it: their weights are unknown.
WEIGHTS_KEY = "weights"

log = logging.getLogger(__name__)


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


@dataclass(frozen=True, eq=False)  # eq on numpy arrays is ambiguous, so identity equality
class PointTable:
    ids: np.ndarray  # int64 (n,)
    latlon: np.ndarray  # float64 (n, 2), degrees (lat, lon)
    country: np.ndarray  # '<U2' (n,), ISO alpha-2 or ""
    #: int8 (n, d) structure descriptors (reference images), or None; zero rows: unknown.
    structure: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise IndexStoreError(
            f"invalid index {what} {value!r}: use 1-64 characters from a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit (e.g. 'h3-res5' or '20240101-120000-000000')"
        )


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise IndexStoreError(f"vectors must be a 2-D (n, dim) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise IndexStoreError(
            f"vectors are empty (shape {arr.shape}); build the gallery embeddings first"
        )
    if not np.issubdtype(arr.dtype, np.floating):
        raise IndexStoreError(f"vectors must be float32, got dtype {arr.dtype}")
    # float16/float64 are cast: FAISS only stores float32 and the cast loses nothing that matters.
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise IndexStoreError(
            f"{bad} vector(s) contain NaN or inf; fix the encoder output before publishing"
        )
    norms = np.linalg.norm(arr, axis=1)
    if np.abs(norms - 1.0).max() > _NORM_TOL:
        raise IndexStoreError(
            "vectors must be unit norm (the metric is inner product = cosine); "
            f"norms range {norms.min():.4g}..{norms.max():.4g}: divide each row by its L2 norm"
        )
    return arr


def _check_points(points: PointTable, n: int) -> PointTable:
    ids = np.asarray(points.ids)
    latlon = np.asarray(points.latlon)
    country = np.asarray(points.country)
    if len(ids) != n or len(latlon) != n or len(country) != n:
        raise IndexStoreError(
            f"point table length mismatch: {n} vectors but ids={len(ids)}, latlon={len(latlon)}, "
            f"country={len(country)}; the table must have one row per vector, in the same order"
        )
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise IndexStoreError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    if ids.dtype == np.uint64 and n and ids.max() > np.iinfo(np.int64).max:
        raise IndexStoreError("ids do not fit in int64 (H3 cell ints always do)")
    if latlon.ndim != 2 or latlon.shape[1] != 2:
        raise IndexStoreError(f"latlon must have shape (n, 2) as (lat, lon), got {latlon.shape}")
    latlon = np.ascontiguousarray(latlon, dtype=np.float64)
    lat, lon = latlon[:, 0], latlon[:, 1]
    if not np.isfinite(latlon).all() or (np.abs(lat) > 90).any() or (np.abs(lon) > 180).any():
        raise IndexStoreError(
            "latlon out of range: need finite (lat, lon) degrees with lat in [-90, 90] and "
            "lon in [-180, 180]; check the column order (lat first)"
        )
    if country.ndim != 1:
        raise IndexStoreError(f"country must be a 1-D array of strings, got shape {country.shape}")
    structure = points.structure
    if structure is not None:
        structure = np.asarray(structure)
        if structure.ndim != 2 or len(structure) != n or structure.dtype != np.int8:
            raise IndexStoreError(
                f"structure descriptors must be an int8 (n, d) array with one row per vector, "
                f"got {structure.dtype} {structure.shape} for {n} vectors"
            )
    bad = [c for c in np.unique(country.astype(str)) if not _COUNTRY_RE.match(c)]
    if bad:
        raise IndexStoreError(
            f"invalid country codes {bad[:5]}: use upper-case ISO alpha-2 or '' for unknown"
        )
    return PointTable(
        ids=np.ascontiguousarray(ids, dtype=np.int64),
        latlon=latlon,
        country=np.ascontiguousarray(country, dtype="<U2"),
        structure=None if structure is None else np.ascontiguousarray(structure),
    )


# ---------------------------------------------------------------------------------------------
# filesystem helpers


def _indexes_dir(root: Path) -> Path:
    return Path(root) / "indexes"


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    # A directory fsync makes created/renamed entries durable; not all platforms allow it.
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with path.open("wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def new_version() -> str:
    """A version name that sorts by creation time (UTC, microseconds)."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


# ---------------------------------------------------------------------------------------------
# faiss helpers


def _make_index(dim: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise IndexStoreError(
            f"bad FAISS factory string {factory!r} for dim {dim}: faiss says: {msg}; "
            f"examples: {_FACTORY_EXAMPLES}"
        ) from exc


def _skip_polysemous_training(index: faiss.Index) -> None:
    # index_factory turns on polysemous training for "PQ" codes; it only serves polysemous
    # (Hamming-filtered) search, which this store never enables, and costs tens of seconds.
    parts = [faiss.downcast_index(index)]
    if isinstance(parts[0], faiss.IndexPreTransform):
        parts.append(faiss.downcast_index(parts[0].index))
    ivf = _ivf_of(index)
    if ivf is not None:
        parts.append(faiss.downcast_index(ivf))
    for part in parts:
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # faiss raises when there is no IVF inside
        return None


def _is_hnsw(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexHNSW)


#: Candidates an HNSW coarse quantizer keeps while it looks for a search's nprobe lists (at
#: least twice nprobe). faiss's default (16) misses lists that hold the nearest neighbours:
#: 1-recall@10 at 10M vectors, nprobe 64, rerank_k 128 went from 0.930 to 0.982 with it
#: (bench/scale.py, 1,000 queries; docs/BENCHMARKS.md).
QUANTIZER_EF = 256


def ivf_params(
    ivf: faiss.IndexIVF, nprobe: int, sel: faiss.IDSelector | None = None
) -> faiss.SearchParametersIVF:
    """Search parameters of an IVF index: ``nprobe`` lists, an optional selector, and the
    coarse quantizer's efSearch where it is an HNSW graph (``QUANTIZER_EF``)."""
    params = faiss.SearchParametersIVF()
    params.nprobe = nprobe
    if sel is not None:
        params.sel = sel
    if _is_hnsw(ivf.quantizer):
        quantizer = faiss.SearchParametersHNSW()
        quantizer.efSearch = max(QUANTIZER_EF, 2 * nprobe)
        params.quantizer_params = quantizer
        params.hnsw_params = quantizer  # kept alive here: faiss holds a raw pointer to it
    return params


# ---------------------------------------------------------------------------------------------
# publication


def _check_publication(
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
    _check_name(name, "name")
    version = new_version() if version is None else version
    _check_name(version, "version")
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
    final_dir = _indexes_dir(root) / name / version
    if final_dir.exists():
        raise IndexStoreError(
            f"index {name!r} version {version!r} already exists at {final_dir}; "
            "published versions are immutable: pick a new version (or omit it for a timestamp)"
        )
    return final_dir, version, extra


def _train(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
    """Train ``index`` (if its factory needs training) on ``sample``."""
    _skip_polysemous_training(index)
    if index.is_trained:
        return
    try:
        index.train(sample)
    except RuntimeError as exc:
        raise IndexStoreError(
            f"training FAISS index {factory!r} on {len(sample)} vectors failed: {exc}; "
            "use more training vectors, fewer IVF lists/PQ centroids, or 'Flat'"
        ) from exc


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
    final_dir, version, extra = _check_publication(
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
    vecs = _check_vectors(vectors)
    n, dim = vecs.shape
    table = _check_points(points, n)
    name_dir = final_dir.parent

    index = _make_index(dim, factory)
    # Train on a seeded sample so that a rebuild from the same vectors is reproducible.
    rng = np.random.default_rng(seed)
    sample = vecs
    if n > train_size:
        sample = vecs[np.sort(rng.choice(n, size=train_size, replace=False))]
    _train(index, sample, factory)
    for start in range(0, n, _ADD_CHUNK):
        index.add(vecs[start : start + _ADD_CHUNK])
    if index.ntotal != n:  # e.g. a factory that deduplicates; row alignment would break
        raise IndexStoreError(f"FAISS index holds {index.ntotal} vectors, expected {n}")

    name_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = name_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        faiss.write_index(index, str(tmp_dir / INDEX_FILE))
        _fsync_file(tmp_dir / INDEX_FILE)
        _save_npy(tmp_dir / IDS_FILE, table.ids)
        _save_npy(tmp_dir / LATLON_FILE, table.latlon)
        _save_npy(tmp_dir / COUNTRY_FILE, table.country)
        if table.structure is not None:
            _save_npy(tmp_dir / STRUCTURE_FILE, table.structure)
        extra.setdefault("faiss_version", faiss.__version__)
        extra.setdefault("build_seconds", round(time.perf_counter() - t0, 3))
        manifest = _finish_publication(
            tmp_dir,
            final_dir,
            profile=profile,
            dim=dim,
            factory=factory,
            gallery_kind=gallery_kind,
            h3_resolution=h3_resolution,
            count=n,
            files=(*DATA_FILES, *((STRUCTURE_FILE,) if table.structure is not None else ())),
            extra=extra,
        )
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _finish_publication(
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
        files={f: _sha256(tmp_dir / f) for f in files},
        created_at=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        extra=extra,
    )
    # The manifest goes last: its presence is what marks a version directory as complete.
    with (tmp_dir / MANIFEST_FILE).open("w", encoding="utf-8") as fh:
        fh.write(manifest.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp_dir)
    if final_dir.exists():  # lost a race with another publisher of the same version
        raise IndexStoreError(
            f"index {manifest.name!r} version {manifest.version!r} was published meanwhile"
        )
    os.rename(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    _fsync_dir(final_dir.parent.parent)
    return manifest


# ---------------------------------------------------------------------------------------------
# large indexes: compressed, trained on a sample, filled chunk by chunk, merged on disk

#: Inverted lists of a compressed index live in this file beside ``index.faiss``.
ONDISK_FILE = "index.ivfdata"
#: Row-aligned float16 copies of a compressed index's vectors, read from disk a few rows at a
#: time to re-score its best candidates exactly (codes alone cap recall; see ``rerank_k``).
EXACT_FILE = "vectors.f16.npy"
DEVICES = ("auto", "cpu", "gpu")


def structure_codes(descriptors: np.ndarray) -> np.ndarray:
    """Packed sign bits (n, d / 8) uint8 of int8 structure descriptors: 1 where a cell is
    brighter than the picture's mean rank. An unknown (all-zero) row packs to all zeros,
    about half the bits away from any real picture's."""
    return np.packbits(np.asarray(descriptors) > 0, axis=1)


def gpu_count() -> int:
    """GPUs faiss can use (0 with faiss-cpu, which has no GPU code at all)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def select_device(prefer: str, gpus: int | None = None) -> str:
    """'cpu' or 'gpu' for a preference 'auto' | 'cpu' | 'gpu' (faiss's GPUs, counted)."""
    if prefer not in DEVICES:
        raise IndexStoreError(f"unknown faiss device {prefer!r}; use one of {DEVICES}")
    gpus = gpu_count() if gpus is None else gpus
    if prefer == "gpu" and gpus == 0:
        raise IndexStoreError(
            "faiss device 'gpu' asked for, but faiss sees no GPU: install the `gpu` extra "
            "(faiss-gpu) on a machine with CUDA, or use 'auto' or 'cpu'"
        )
    return "gpu" if prefer != "cpu" and gpus > 0 else "cpu"


def compressed_factory(n: int, dim: int) -> str:
    """The factory string used for ``n`` vectors of ``dim`` above the compression threshold.

    About 4·sqrt(n) inverted lists (a power of two, 1024..65536) found by an HNSW graph over
    the centroids, so that assigning a vector stays fast with many lists, and PQ codes of
    dim/4 bytes (128 for 512-d: 1.3 GB for 10M vectors). No OPQ rotation by default: on
    clustered 512-d data it gave the same recall for 11x the training time
    (docs/BENCHMARKS.md); a factory string can still ask for one.
    """
    nlist = 1 << round(np.log2(max(4 * np.sqrt(max(n, 1)), 1)))
    nlist = int(min(max(nlist, 1024), 65536))
    m = dim // 4
    while m > 1 and dim % m:
        m -= 1
    return f"IVF{nlist}_HNSW32,PQ{m}"


@dataclass(frozen=True)
class VectorChunk:
    """One chunk of a gallery that is too large to hold at once: vectors and their points."""

    vectors: np.ndarray
    points: PointTable


class ExactVectors:
    """The ``EXACT_FILE`` of an index: float16 rows on disk, read a few rows at a time.

    Only the rows a search re-scores are read, with positional reads (not a memory map),
    so they pass through the operating system's file cache, which gives them back under
    memory pressure, and never count towards the process's memory. The rows of one call
    are announced together first (``POSIX_FADV_WILLNEED``) so that their reads from disk
    overlap instead of waiting one after another. Safe to share between threads.
    """

    def __init__(self, path: Path) -> None:
        # numpy reads the header (and refuses a short file); only its layout is kept.
        header = np.load(path, mmap_mode="r", allow_pickle=False)
        if header.ndim != 2 or header.dtype != np.float16 or not header.flags.c_contiguous:
            raise IndexStoreError(
                f"{path} must hold a C-order float16 (n, dim) array, got {header.dtype} "
                f"{header.shape}; rebuild the index"
            )
        self.shape = (int(header.shape[0]), int(header.shape[1]))
        self._offset = int(header.offset)
        self._row_bytes = self.shape[1] * 2
        del header
        self._fd = os.open(path, os.O_RDONLY)
        self._advise = hasattr(os, "posix_fadvise")
        if self._advise:  # no read-ahead of neighbouring rows: they are not wanted
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            os.close(self._fd)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 (m, dim) copies of ``rows`` (valid row numbers), in their order."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        size = self._row_bytes
        if len(r) and (np.diff(r) == 1).all():  # a range: one read
            data = os.pread(self._fd, size * len(r), int(r[0]) * size + self._offset)
        else:
            starts = (r * size + self._offset).tolist()
            if self._advise and len(starts) > 1:
                for start in starts:
                    os.posix_fadvise(self._fd, start, size, os.POSIX_FADV_WILLNEED)
            data = b"".join([os.pread(self._fd, size, start) for start in starts])
        if len(data) != size * len(r):
            raise IndexStoreError("the exact vectors file was cut short while being read")
        return (
            np.frombuffer(data, dtype=np.float16).reshape(len(r), self.shape[1]).astype(np.float32)
        )


def _write_exact_header(fh: Any, count: int, dim: int) -> None:
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (count, dim)}
    )


def rerank(
    queries: np.ndarray, rows: np.ndarray, k: int, exact: ExactVectors
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each query's candidate ``rows`` by exact inner product:
    (scores (q, k), rows (q, k)).

    ``rows`` are a search's (q, c) answer (row -1: no candidate); the distinct rows of all
    queries are read from disk once, together, in file order.
    """
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_r = np.full((len(queries), k), -1, dtype=np.int64)
    valid = rows >= 0
    if not valid.any():
        return out_s, out_r
    uniq, inverse = np.unique(rows[valid], return_inverse=True)
    vecs = exact.take(uniq)
    where = np.zeros(rows.shape, dtype=np.int64)
    where[valid] = inverse
    for i, q in enumerate(queries):
        cand = np.nonzero(valid[i])[0]
        s = vecs[where[i, cand]] @ q
        best = np.argsort(-s, kind="stable")[:k]
        out_s[i, : len(best)] = s[best]
        out_r[i, : len(best)] = rows[i, cand[best]]
    return out_s, out_r


def _to_gpu_training(index: faiss.Index) -> None:
    # k-means of the coarse quantizer is the slow part of training: run it on the GPUs.
    ivf = _ivf_of(index)
    if ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))


def _clone_empty(trained: faiss.Index) -> faiss.Index:
    return faiss.deserialize_index(faiss.serialize_index(trained))


def exact_top_k(
    queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Rows of the exact top-k inner products over vectors given chunk by chunk (q, k)."""
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_r = np.full((nq, k), -1, dtype=np.int64)
    start = 0
    for chunk in chunks:
        s = queries @ np.asarray(chunk, dtype=np.float32).T
        rows = np.arange(start, start + s.shape[1], dtype=np.int64)
        if exclude is not None:  # a query drawn from the gallery must not find itself
            hit = (exclude[:, None] >= start) & (exclude[:, None] < start + s.shape[1])
            qi = np.nonzero(hit[:, 0])[0]
            s[qi, exclude[qi] - start] = -np.inf
        all_s = np.concatenate([best_s, s], axis=1)
        all_r = np.concatenate([best_r, np.broadcast_to(rows, s.shape)], axis=1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(all_s, top, axis=1)
        best_r = np.take_along_axis(all_r, top, axis=1)
        start += s.shape[1]
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_r, order, axis=1)


def recall_1_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of queries whose exact nearest neighbour is among the found rows."""
    return float((found == exact[:, :1]).any(axis=1).mean())


def publish_index_chunked(
    root: Path,
    name: str,
    chunks: Callable[[], Iterable[VectorChunk]],
    *,
    count: int,
    dim: int,
    train_vectors: np.ndarray,
    profile: str,
    gallery_kind: str,
    h3_resolution: int | None = None,
    factory: str = "",
    version: str | None = None,
    extra: dict | None = None,
    device: str = "cpu",
    recall_queries: int = 200,
    nprobe: int | None = None,
    rerank_k: int = 0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Publish an index over a gallery given as chunks, never holding all vectors at once.

    ``chunks()`` yields the gallery in row order (it is called twice: to fill the index and
    to compute exact neighbours for the recall measurement). An IVF factory (by default
    :func:`compressed_factory`) is trained on ``train_vectors`` (a sample), each chunk
    fills its own block index, and the blocks' inverted lists are merged into one
    ``index.ivfdata`` file that is memory-mapped at load. Other factories are filled
    chunk by chunk in memory. With ``rerank_k`` > 0 (not for "Flat") every vector is also
    kept as float16 in ``EXACT_FILE``, and searches re-score their best ``rerank_k``
    candidates with those exact vectors read from disk. The manifest records the factory
    and the measured 1-recall@10 at ``nprobe`` (and ``rerank_k``) over ``recall_queries``
    gallery vectors (each must not find itself), against exact search.
    """
    t0 = time.perf_counter()
    final_dir, version, extra = _check_publication(
        root,
        name,
        version,
        profile=profile,
        gallery_kind=gallery_kind,
        h3_resolution=h3_resolution,
        extra=extra,
    )
    if count < 1:
        raise IndexStoreError("the gallery is empty: nothing to index")
    if rerank_k < 0:
        raise IndexStoreError(f"rerank_k must be >= 0 (0: no exact re-ranking), got {rerank_k}")
    factory = factory or compressed_factory(count, dim)
    rerank_k = int(rerank_k) if factory != "Flat" else 0
    device = select_device(device)
    name_dir = final_dir.parent
    train = _check_vectors(train_vectors)
    if train.shape[1] != dim:
        raise IndexStoreError(f"training vectors have dimension {train.shape[1]}, not {dim}")
    trained = _make_index(dim, factory)
    if device == "gpu":
        _to_gpu_training(trained)
    _train(trained, train, factory)
    t_train = time.perf_counter()
    ivf = _ivf_of(trained)
    if ivf is not None:
        ivf.clustering_index = None

    rng = np.random.default_rng(seed)
    n_recall = min(int(recall_queries), count - 1) if factory != "Flat" else 0
    recall_rows = np.sort(rng.choice(count, size=n_recall, replace=False)) if n_recall else None
    recall_q = np.zeros((n_recall, dim), dtype=np.float32)
    ids = np.empty(count, dtype=np.int64)
    latlon = np.empty((count, 2), dtype=np.float64)
    country = np.empty(count, dtype="<U2")
    structure: np.ndarray | None = None  # on disk, opened at the first chunk that has some

    name_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = name_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    exact_fh = (tmp_dir / EXACT_FILE).open("wb") if rerank_k else None
    try:
        if exact_fh is not None:
            _write_exact_header(exact_fh, count, dim)
        blocks: list[Path] = []
        whole = trained if ivf is None else None
        start = 0
        for chunk in chunks():
            vecs = _check_vectors(chunk.vectors)
            n = len(vecs)
            if vecs.shape[1] != dim or start + n > count:
                raise IndexStoreError(
                    f"chunk at row {start} has shape {vecs.shape}: expected dimension {dim} "
                    f"and {count} rows in all"
                )
            table = _check_points(chunk.points, n)
            ids[start : start + n] = table.ids
            latlon[start : start + n] = table.latlon
            country[start : start + n] = table.country
            if table.structure is not None and structure is None:
                structure = np.lib.format.open_memmap(
                    tmp_dir / STRUCTURE_FILE, "w+", np.int8, (count, table.structure.shape[1])
                )  # zero rows (unknown) until filled
            if structure is not None and table.structure is not None:
                if table.structure.shape[1] != structure.shape[1]:
                    raise IndexStoreError(
                        f"chunk at row {start} has structure descriptors of width "
                        f"{table.structure.shape[1]}, earlier chunks {structure.shape[1]}"
                    )
                structure[start : start + n] = table.structure
            if recall_rows is not None:
                sel = (recall_rows >= start) & (recall_rows < start + n)
                recall_q[sel] = vecs[recall_rows[sel] - start]
            if exact_fh is not None:
                exact_fh.write(vecs.astype(np.float16).tobytes())
            if whole is not None:
                whole.add(vecs)
            else:
                block = _clone_empty(trained)
                block.add_with_ids(vecs, np.arange(start, start + n, dtype=np.int64))
                blocks.append(tmp_dir / f"block-{len(blocks):05d}.faiss")
                faiss.write_index(block, str(blocks[-1]))
                del block
            start += n
            if progress is not None:
                progress(n)
        if start != count:
            raise IndexStoreError(f"the chunks held {start} rows, expected {count}")
        if exact_fh is not None:
            exact_fh.close()  # fsynced with the other large files below
        t_fill = time.perf_counter()
        if whole is None:
            whole = _merge_blocks(trained, blocks, tmp_dir / ONDISK_FILE)
            for b in blocks:
                b.unlink()
        if whole.ntotal != count:
            raise IndexStoreError(f"FAISS index holds {whole.ntotal} vectors, expected {count}")
        whole_ivf = _ivf_of(whole)
        if whole_ivf is not None and nprobe is not None:
            # Stored with the index: the default of searches that do not name an nprobe.
            whole_ivf.nprobe = min(int(nprobe), whole_ivf.nlist)
        faiss.write_index(whole, str(tmp_dir / INDEX_FILE))
        t_merge = time.perf_counter()
        recall = None
        if recall_rows is not None:
            exact = exact_top_k(recall_q, (c.vectors for c in chunks()), 10, recall_rows)
            exact_vectors = ExactVectors(tmp_dir / EXACT_FILE) if rerank_k else None
            recall = _measure_recall(whole, recall_q, recall_rows, exact, exact_vectors, rerank_k)
            del exact_vectors
        del whole
        if structure is not None:
            structure.flush()
            del structure
        data_files = [
            *DATA_FILES,
            *(f for f in (ONDISK_FILE, EXACT_FILE, STRUCTURE_FILE) if (tmp_dir / f).exists()),
        ]
        for f in data_files:
            if f in (INDEX_FILE, ONDISK_FILE, EXACT_FILE, STRUCTURE_FILE):
                _fsync_file(tmp_dir / f)
        _save_npy(tmp_dir / IDS_FILE, ids)
        _save_npy(tmp_dir / LATLON_FILE, latlon)
        _save_npy(tmp_dir / COUNTRY_FILE, country)
        extra.setdefault("faiss_version", faiss.__version__)
        extra.update(
            {
                "faiss_device": device,
                "train_vectors": len(train),
                "train_seconds": round(t_train - t0, 3),
                "fill_seconds": round(t_fill - t_train, 3),
                "merge_seconds": round(t_merge - t_fill, 3),
                "on_disk": (tmp_dir / ONDISK_FILE).exists(),
                "rerank_k": rerank_k,
            }
        )
        if recall is not None:
            extra.update(recall)
        extra.setdefault("build_seconds", round(time.perf_counter() - t0, 3))
        manifest = _finish_publication(
            tmp_dir,
            final_dir,
            profile=profile,
            dim=dim,
            factory=factory,
            gallery_kind=gallery_kind,
            h3_resolution=h3_resolution,
            count=count,
            files=tuple(data_files),
            extra=extra,
        )
    except BaseException:
        if exact_fh is not None:
            exact_fh.close()
        structure = None  # unmap before the directory goes
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _merge_blocks(trained: faiss.Index, blocks: list[Path], ivfdata: Path) -> faiss.Index:
    """One index whose inverted lists, merged from the block files, live in ``ivfdata``."""
    index = _clone_empty(trained)
    ivf = faiss.extract_index_ivf(index)
    # Blocks are read memory-mapped, so the merge never holds all codes in RAM; the block
    # indexes stay referenced until the merge is done because they own those lists.
    opened = [faiss.read_index(str(b), faiss.IO_FLAG_MMAP) for b in blocks]
    sources = faiss.InvertedListsPtrVector()
    for block in opened:
        sources.push_back(faiss.extract_index_ivf(block).invlists)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ntotal = ondisk.merge_from_multiple(sources.data(), sources.size(), False)
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # the index owns the lists now
    ivf.ntotal = ntotal
    index.ntotal = ntotal
    del opened
    return index


def _measure_recall(
    index: faiss.Index,
    queries: np.ndarray,
    self_rows: np.ndarray,
    exact: np.ndarray,
    exact_vectors: ExactVectors | None,
    rerank_k: int,
) -> dict[str, Any]:
    """1-recall@10 of the index at its own nprobe (and rerank_k), for the manifest."""
    ivf = _ivf_of(index)
    params = None if ivf is None else ivf_params(ivf, ivf.nprobe)
    k = exact.shape[1] + 1
    _, found = index.search(queries, max(k, rerank_k), params=params)
    if exact_vectors is not None:
        _, found = rerank(queries, found, k, exact_vectors)
    found = np.array(
        [
            [r for r in row if r != own][: exact.shape[1]]
            for row, own in zip(found, self_rows, strict=True)
        ]
    )
    return {
        "recall_at_10": round(recall_1_at_k(found, exact), 4),
        "recall_nprobe": None if ivf is None else int(ivf.nprobe),
        "recall_rerank_k": rerank_k,
        "recall_queries": len(queries),
        "recall_protocol": "1-recall@10 of gallery vectors (each excluded from its own "
        "results) against exact inner-product search",
    }


# ---------------------------------------------------------------------------------------------
# discovery


def _read_manifest(version_dir: Path) -> Manifest:
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
    _check_name(name, "name")
    name_dir = _indexes_dir(root) / name
    stale = sorted(name_dir.glob(".tmp-*")) if name_dir.is_dir() else []
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def list_indexes(root: Path, name: str | None = None) -> list[Manifest]:
    """Every complete published index (optionally of one name), sorted by (name, version)."""
    base = _indexes_dir(root)
    if name is not None:
        _check_name(name, "name")
        name_dirs = [base / name]
    elif base.is_dir():
        name_dirs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    else:
        name_dirs = []
    manifests = [_read_manifest(v) for d in name_dirs for v in _version_dirs(d)]
    return sorted(manifests, key=lambda m: (m.name, m.version))


def latest_version(root: Path, name: str) -> str:
    """The most recently published version of ``name`` (by created_at, then version)."""
    manifests = list_indexes(root, name)
    if not manifests:
        known = sorted({m.name for m in list_indexes(root)})
        raise IndexStoreError(
            f"no published index named {name!r} under {_indexes_dir(root)}; "
            f"known: {known or 'none'}; build one with `geoloc index build`"
        )
    return max(manifests, key=lambda m: (m.created_at, m.version)).version


# ---------------------------------------------------------------------------------------------
# loading and search


#: Below this many queries a search runs on one OpenMP thread. faiss's idle OpenMP
#: workers spin after a parallel region and starve the torch matmuls that follow in
#: the same request (measured: refinement 3x slower on 2 cores); a few queries gain
#: nothing from threads anyway.
SMALL_QUERY_BATCH = 32


@contextlib.contextmanager
def _search_threads(n_queries: int) -> Iterator[None]:
    # omp_set_num_threads sets the calling thread's own OpenMP setting, so concurrent
    # searches from other threads are not affected.
    if n_queries >= SMALL_QUERY_BATCH:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _allowed_selector(
    allowed: np.ndarray | None, n: int
) -> tuple[np.ndarray | None, np.ndarray | None, faiss.IDSelector | None]:
    """(mask, bitmap, selector) for a search limited to the ``allowed`` rows (all None
    without a mask). The selector holds a raw pointer into ``bitmap``: keep both alive until
    the search returns."""
    if allowed is None:
        return None, None, None
    mask = np.asarray(allowed)
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise IndexStoreError(
            f"allowed must be a bool mask of shape ({n},), got {mask.dtype} {mask.shape}"
        )
    # IDSelectorBitmap reads bit (i & 7) of byte i >> 3: little bit order.
    bitmap = np.packbits(mask, bitorder="little")
    return mask, bitmap, faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))


@dataclass
class LoadedIndex:
    manifest: Manifest
    path: Path
    index: faiss.Index
    points: PointTable
    #: Exact (float16, on disk) copies of the vectors of a compressed index, if it kept them.
    exact: ExactVectors | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _direct_map: bool = field(default=False, init=False, repr=False)
    _structure_codes: faiss.IndexBinaryFlat | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int | None:
        """IVF lists a search probes when it names no nprobe (None: not an IVF index)."""
        ivf = _ivf_of(self.index)
        return None if ivf is None else int(ivf.nprobe)

    @property
    def rerank_k(self) -> int:
        """Candidates a search re-scores with exact vectors when it names no rerank_k
        (the manifest's; 0 without exact vectors)."""
        return int(self.manifest.extra.get("rerank_k") or 0) if self.exact is not None else 0

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.manifest.dim:
            raise IndexStoreError(
                f"queries must have shape (q, {self.manifest.dim}) for index "
                f"{self.manifest.name}/{self.manifest.version}, got {q.shape}"
            )
        return np.ascontiguousarray(q, dtype=np.float32)

    def _params(
        self, sel: faiss.IDSelector | None, nprobe: int | None
    ) -> faiss.SearchParameters | None:
        ivf = _ivf_of(self.index)
        if ivf is not None:
            if nprobe is not None and nprobe < 1:
                raise IndexStoreError(f"nprobe must be >= 1, got {nprobe}")
            # Without an explicit nprobe the index's own setting applies.
            return ivf_params(ivf, min(int(nprobe), ivf.nlist) if nprobe else ivf.nprobe, sel)
        if sel is None:
            return None  # nprobe means nothing outside IVF: ignored
        if _is_hnsw(self.index):
            return faiss.SearchParametersHNSW(sel=sel)
        return faiss.SearchParameters(sel=sel)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        allowed: np.ndarray | None = None,
        nprobe: int | None = None,
        rerank_k: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product: (scores (q, k) float32, rows (q, k) int64).

        Missing results (fewer than k candidates) have row -1 and score -inf. An index
        with exact vectors re-scores its best ``rerank_k`` candidates (None: the manifest's
        ``rerank_k``; 0: off) with them and returns exact scores; others ignore it.
        """
        q = self._queries(queries)
        n = len(self)
        if k < 1:
            raise IndexStoreError(f"k must be >= 1, got {k}")
        if rerank_k is not None and rerank_k < 0:
            raise IndexStoreError(f"rerank_k must be >= 0 (0: off), got {rerank_k}")
        k = min(int(k), n)
        rerank_k = self.rerank_k if rerank_k is None else rerank_k
        depth = min(max(k, rerank_k), n) if self.exact is not None and rerank_k else 0
        mask, _bitmap, sel = _allowed_selector(allowed, n)  # _bitmap outlives the search
        params = self._params(sel, nprobe)
        try:
            with _search_threads(len(q)):
                scores, rows = self.index.search(q, depth or k, params=params)
        except RuntimeError:
            if mask is None:
                raise
            # Some index types (e.g. IndexPQ, IndexRefine) reject search parameters: search
            # everything and filter here instead; slower but correct.
            scores, rows = self._filter_fallback(q, depth or k, mask)
        rows = rows.astype(np.int64, copy=False)
        if depth and self.exact is not None:
            return rerank(q, rows, k, self.exact)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return scores, rows

    def _structure_index(self) -> faiss.IndexBinaryFlat:
        structure = self.points.structure
        if structure is None:
            raise IndexStoreError(
                f"index {self.manifest.name}/{self.manifest.version} holds no structure "
                "descriptors; rebuild it with a release that stores them"
            )
        with self._lock:  # built once, on first use: one bit a descriptor cell
            if self._structure_codes is None:
                codes = faiss.IndexBinaryFlat(structure.shape[1])
                for start in range(0, len(structure), _ADD_CHUNK):
                    codes.add(structure_codes(structure[start : start + _ADD_CHUNK]))
                self._structure_codes = codes
            return self._structure_codes

    def search_structure(
        self, descriptors: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows (q, k) int64 whose structure descriptors best agree with each query's, by the
        Hamming distance of their signs (which cells lie above the picture's median
        luminance): a fast shortlist found without the embedding, for the caller to rank
        again by the exact correlation. Missing results have row -1."""
        d = np.asarray(descriptors)
        codes = self._structure_index()
        if d.ndim != 2 or d.shape[1] != codes.d:
            raise IndexStoreError(f"descriptors must have shape (q, {codes.d}), got {d.shape}")
        if k < 1:
            raise IndexStoreError(f"k must be >= 1, got {k}")
        n = len(self)
        _, _bitmap, sel = _allowed_selector(allowed, n)  # _bitmap outlives the search
        params = None if sel is None else faiss.SearchParameters(sel=sel)
        with _search_threads(len(d)):
            _, rows = codes.search(structure_codes(d), min(int(k), n), params=params)
        return rows.astype(np.int64, copy=False)

    def _filter_fallback(
        self, q: np.ndarray, k: int, mask: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        all_s, all_r = self.index.search(q, len(self), params=self._params(None, None))
        keep = (all_r >= 0) & mask[np.clip(all_r, 0, None)]
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_r = np.full((len(q), k), -1, dtype=np.int64)
        for i in range(len(q)):
            sel_r = all_r[i][keep[i]][:k]  # faiss results are already sorted by score
            out_r[i, : len(sel_r)] = sel_r
            out_s[i, : len(sel_r)] = all_s[i][keep[i]][:k]
        return out_s, out_r

    def all_scores(self, queries: np.ndarray) -> np.ndarray:
        """(q, n) inner products with every row, in row order (for a softmax over the gallery)."""
        q = self._queries(queries)
        n = len(self)
        ivf = _ivf_of(self.index)
        # Probe every IVF list so no row is left out; other indexes use their defaults.
        params = faiss.SearchParametersIVF(nprobe=ivf.nlist) if ivf is not None else None
        with _search_threads(len(q)):
            scores, rows = self.index.search(q, n, params=params)
        out = np.full((len(q), n), np.nan, dtype=np.float32)
        valid = rows >= 0
        qi = np.nonzero(valid)[0]
        out[qi, rows[valid]] = scores[valid]
        missing = np.isnan(out)
        if missing.any():
            # Graph indexes (HNSW) do not visit every node; score the rest from stored vectors.
            miss_rows = np.nonzero(missing.any(axis=0))[0]
            for start in range(0, len(miss_rows), _ADD_CHUNK):
                chunk = miss_rows[start : start + _ADD_CHUNK]
                fill = q @ self.vectors(chunk).T
                sub = out[:, chunk]
                out[:, chunk] = np.where(np.isnan(sub), fill, sub)
        return out

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors of ``rows`` (float32 (m, dim)): exact for Flat, float16-exact for
        an index that kept its exact vectors, decoded from the codes otherwise."""
        r = np.ascontiguousarray(np.asarray(rows), dtype=np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= len(self)):
            raise IndexStoreError(f"rows out of range 0..{len(self) - 1}")
        if self.exact is not None:
            return self.exact.take(r)
        ivf = _ivf_of(self.index)
        if ivf is not None and not self._direct_map:
            with self._lock:  # make_direct_map mutates the index: once, under a lock
                if not self._direct_map:
                    ivf.make_direct_map()
                    self._direct_map = True
        try:
            return self.index.reconstruct_batch(r)
        except RuntimeError as exc:
            raise IndexStoreError(
                f"index type {self.manifest.factory!r} cannot reconstruct stored vectors "
                f"({str(exc).strip().splitlines()[-1]}); use a 'Flat', 'HNSW' or IVF index"
            ) from exc


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


def _read_faiss(path: Path) -> faiss.Index:
    if (path.parent / ONDISK_FILE).is_file():
        # Inverted lists on disk (mmapped by faiss): the index file names the lists file by
        # the path it was built at, so look for it beside the index file instead.
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        # Not every index type can be memory-mapped; a normal read is correct, just uses RAM.
        return faiss.read_index(str(path))


def load_index(
    root: Path,
    name: str,
    version: str | None = None,
    *,
    profile: str | None = None,
    dim: int | None = None,
    weights: str | None = None,
    verify: bool = True,
) -> LoadedIndex:
    """Open a published index (latest version by default), verifying checksums and profile.

    ``weights``: the model's weights identity; an index built with other weights is refused
    (IndexWeightsError), one that records none (older manifests) loads with a warning.
    """
    _check_name(name, "name")
    if version is None:
        version = latest_version(root, name)
    _check_name(version, "version")
    path = _indexes_dir(root) / name / version
    if not (path / MANIFEST_FILE).is_file():
        known = [m.version for m in list_indexes(root, name)]
        raise IndexStoreError(
            f"index {name!r} has no published version {version!r}; known versions: "
            f"{known or 'none'}; build one with `geoloc index build`"
        )
    manifest = _read_manifest(path)
    if manifest.name != name or manifest.version != version:
        raise IndexStoreError(
            f"manifest in {path} names {manifest.name}/{manifest.version}: the directory was "
            "moved or renamed; rebuild with `geoloc index build`"
        )
    if profile is not None and profile != manifest.profile:
        raise IndexStoreError(
            f"index {name}/{version} was built for profile {manifest.profile!r} but the service "
            f"runs profile {profile!r}; rebuild the index for this profile or pick another index"
        )
    if dim is not None and int(dim) != manifest.dim:
        raise IndexStoreError(
            f"index {name}/{version} has dimension {manifest.dim} but the model embeds in "
            f"{dim}; rebuild the index for this profile or pick another index"
        )
    if weights is not None:
        check_weights(manifest, weights)
    missing = [f for f in DATA_FILES if f not in manifest.files or not (path / f).is_file()]
    if missing:
        raise IndexStoreError(f"index {path} lacks {missing}; rebuild with `geoloc index build`")
    if verify:
        for fname, expected in manifest.files.items():
            if _sha256(path / fname) != expected:
                raise IndexStoreError(
                    f"checksum mismatch for {fname} in {path}: the file is corrupt or was "
                    "changed after publication; rebuild with `geoloc index build`"
                )
    try:
        index = _read_faiss(path / INDEX_FILE)
        points = PointTable(
            ids=np.load(path / IDS_FILE, mmap_mode="r", allow_pickle=False),
            latlon=np.load(path / LATLON_FILE, mmap_mode="r", allow_pickle=False),
            country=np.load(path / COUNTRY_FILE, mmap_mode="r", allow_pickle=False),
            structure=np.load(path / STRUCTURE_FILE, mmap_mode="r", allow_pickle=False)
            if STRUCTURE_FILE in manifest.files
            else None,
        )
        exact = ExactVectors(path / EXACT_FILE) if EXACT_FILE in manifest.files else None
    except (RuntimeError, ValueError, OSError) as exc:
        raise IndexStoreError(
            f"cannot read index files in {path}: {exc}; rebuild with `geoloc index build`"
        ) from exc
    if points.structure is not None and (
        points.structure.ndim != 2
        or len(points.structure) != manifest.count
        or points.structure.dtype != np.int8
    ):
        raise IndexStoreError(
            f"{path / STRUCTURE_FILE} holds {points.structure.dtype} {points.structure.shape}, "
            f"not int8 rows for the manifest's {manifest.count}; rebuild the index"
        )
    if index.d != manifest.dim or index.ntotal != manifest.count or len(points) != manifest.count:
        raise IndexStoreError(
            f"index {path} disagrees with its manifest (dim {index.d} vs {manifest.dim}, count "
            f"{index.ntotal}/{len(points)} vs {manifest.count}); rebuild with `geoloc index build`"
        )
    if exact is not None and exact.shape != (manifest.count, manifest.dim):
        raise IndexStoreError(
            f"{path / EXACT_FILE} has shape {exact.shape}, the manifest says "
            f"({manifest.count}, {manifest.dim}); rebuild with `geoloc index build`"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexStoreError(f"index {path} is not inner-product; rebuild it")
    return LoadedIndex(manifest=manifest, path=path, index=index, points=points, exact=exact)
