"""Loading a published index (checksums, profile, weights, memory maps) and searching it."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from index.exact import ExactVectors, rerank
from index.faiss_helpers import ADD_CHUNK, is_hnsw, ivf_of, ivf_params, read_faiss
from index.files import sha256_file
from index.manifest import (
    COLOUR_FILE,
    COUNTRY_FILE,
    DATA_FILES,
    EXACT_FILE,
    IDS_FILE,
    INDEX_FILE,
    LATLON_FILE,
    MANIFEST_FILE,
    STRUCTURE_FILE,
    WIDTH_FILE,
    IndexStoreError,
    Manifest,
    check_name,
    check_weights,
    indexes_dir,
    latest_version,
    list_indexes,
    read_manifest,
)
from index.points import PointTable, check_rows

__all__ = ["SMALL_QUERY_BATCH", "LoadedIndex", "colour_codes", "load_index", "structure_codes"]


def structure_codes(descriptors: np.ndarray) -> np.ndarray:
    """Packed sign bits (n, d / 8) uint8 of int8 structure descriptors: 1 where a cell is
    brighter than the picture's mean rank. An unknown (all-zero) row packs to all zeros,
    about half the bits away from any real picture's."""
    return np.packbits(np.asarray(descriptors) > 0, axis=1)


def colour_codes(thumbnails: np.ndarray) -> np.ndarray:
    """(n, d / 4) float32 of RGB colour thumbnails (n, d) laid out on a square grid of cells
    (uint8 RGB, row-major, as ``encoders.structure.colour_thumbnails``): the mean of each 2 × 2
    block of cells, a quarter of the numbers for a colour search to scan (the caller ranks its
    shortlist again by the full thumbnails)."""
    t = np.asarray(thumbnails, dtype=np.float32)
    side = math.isqrt(t.shape[1] // 3) if t.ndim == 2 else 0
    if t.ndim != 2 or side == 0 or 3 * side * side != t.shape[1] or side % 2:
        raise IndexStoreError(f"colour thumbnails of shape {t.shape} are no even RGB grid")
    half = side // 2
    return t.reshape(len(t), half, 2, half, 2, 3).mean(axis=(2, 4)).reshape(len(t), 3 * half**2)


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


def _checked_mask(allowed: np.ndarray, n: int) -> np.ndarray:
    mask = np.asarray(allowed)
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise IndexStoreError(
            f"allowed must be a bool mask of shape ({n},), got {mask.dtype} {mask.shape}"
        )
    return mask


def _allowed_selector(
    allowed: np.ndarray | None, n: int
) -> tuple[np.ndarray | None, np.ndarray | None, faiss.IDSelector | None]:
    """(mask, bitmap, selector) for a search limited to the ``allowed`` rows (all None
    without a mask). The selector holds a raw pointer into ``bitmap``: keep both alive until
    the search returns."""
    if allowed is None:
        return None, None, None
    mask = _checked_mask(allowed, n)
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
    _colour_codes: tuple[faiss.IndexScalarQuantizer, np.ndarray] | None = field(
        default=None, init=False, repr=False
    )

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int | None:
        """IVF lists a search probes when it names no nprobe (None: not an IVF index)."""
        ivf = ivf_of(self.index)
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
        ivf = ivf_of(self.index)
        if ivf is not None:
            if nprobe is not None and nprobe < 1:
                raise IndexStoreError(f"nprobe must be >= 1, got {nprobe}")
            # Without an explicit nprobe the index's own setting applies.
            return ivf_params(ivf, min(int(nprobe), ivf.nlist) if nprobe else ivf.nprobe, sel)
        if sel is None:
            return None  # nprobe means nothing outside IVF: ignored
        if is_hnsw(self.index):
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

    def structure_index(self) -> faiss.IndexBinaryFlat:
        """The sign codes ``search_structure`` scans, built once (one bit a descriptor cell).
        A loader calls it up front, so that no request pays for the build."""
        structure = self._stored("structure", "structure descriptors")
        with self._lock:
            if self._structure_codes is None:
                codes = faiss.IndexBinaryFlat(structure.shape[1])
                for start in range(0, len(structure), ADD_CHUNK):
                    codes.add(structure_codes(structure[start : start + ADD_CHUNK]))
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
        codes = self.structure_index()
        if d.ndim != 2 or d.shape[1] != codes.d:
            raise IndexStoreError(f"descriptors must have shape (q, {codes.d}), got {d.shape}")
        return self._scan(codes, structure_codes(d), k, allowed)

    def colour_index(self) -> tuple[faiss.IndexScalarQuantizer, np.ndarray]:
        """The codes ``search_colour`` scans (``colour_codes`` rounded to bytes, 48 a
        reference), and which rows have a thumbnail at all; built once. A loader calls it up
        front, so that no request pays for the build."""
        colour = self._stored("colour", "colour thumbnails")
        with self._lock:
            if self._colour_codes is None:
                codes = faiss.IndexScalarQuantizer(
                    colour.shape[1] // 4, faiss.ScalarQuantizer.QT_8bit_direct, faiss.METRIC_L2
                )
                known = np.empty(len(colour), dtype=bool)
                for start in range(0, len(colour), ADD_CHUNK):
                    chunk = np.asarray(colour[start : start + ADD_CHUNK])
                    known[start : start + len(chunk)] = chunk.any(axis=1)
                    codes.add(np.round(colour_codes(chunk)))
                self._colour_codes = (codes, known)
            return self._colour_codes

    def search_colour(
        self, thumbnails: np.ndarray, k: int, *, allowed: np.ndarray | None = None
    ) -> np.ndarray:
        """Rows (q, k) int64 whose colour thumbnails lie nearest each query's (squared
        distance of their ``colour_codes``): a shortlist found without the embedding or the
        layout, for the caller to rank again by the full thumbnails. Rows stored without a
        thumbnail are never found; missing results have row -1."""
        t = np.asarray(thumbnails)
        codes, known = self.colour_index()
        if t.ndim != 2 or t.shape[1] != 4 * codes.d:
            raise IndexStoreError(f"thumbnails must have shape (q, {4 * codes.d}), got {t.shape}")
        mask = known if allowed is None else known & _checked_mask(allowed, len(self))
        return self._scan(codes, colour_codes(t), k, mask)

    def _stored(self, field: str, what: str) -> np.ndarray:
        """The point table's ``field`` rows; IndexStoreError if this index stores none."""
        rows = getattr(self.points, field)
        if rows is None:
            raise IndexStoreError(
                f"index {self.manifest.name}/{self.manifest.version} holds no {what}; rebuild "
                "it with a release that stores them"
            )
        return rows

    def _scan(
        self, codes: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> np.ndarray:
        """Rows (q, k) int64 of the codes nearest each query's code, among the ``allowed``
        rows (a bool mask; None: all); -1 where there are fewer."""
        if k < 1:
            raise IndexStoreError(f"k must be >= 1, got {k}")
        n = len(self)
        _, _bitmap, sel = _allowed_selector(allowed, n)  # _bitmap outlives the search
        params = None if sel is None else faiss.SearchParameters(sel=sel)
        with _search_threads(len(queries)):
            _, rows = codes.search(queries, min(int(k), n), params=params)
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
        ivf = ivf_of(self.index)
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
            for start in range(0, len(miss_rows), ADD_CHUNK):
                chunk = miss_rows[start : start + ADD_CHUNK]
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
        ivf = ivf_of(self.index)
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
    check_name(name, "name")
    if version is None:
        version = latest_version(root, name)
    check_name(version, "version")
    path = indexes_dir(root) / name / version
    if not (path / MANIFEST_FILE).is_file():
        known = [m.version for m in list_indexes(root, name)]
        raise IndexStoreError(
            f"index {name!r} has no published version {version!r}; known versions: "
            f"{known or 'none'}; build one with `geoloc index build`"
        )
    manifest = read_manifest(path)
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
            if sha256_file(path / fname) != expected:
                raise IndexStoreError(
                    f"checksum mismatch for {fname} in {path}: the file is corrupt or was "
                    "changed after publication; rebuild with `geoloc index build`"
                )
    try:
        index = read_faiss(path / INDEX_FILE)
        points = PointTable(
            ids=np.load(path / IDS_FILE, mmap_mode="r", allow_pickle=False),
            latlon=np.load(path / LATLON_FILE, mmap_mode="r", allow_pickle=False),
            country=np.load(path / COUNTRY_FILE, mmap_mode="r", allow_pickle=False),
            structure=np.load(path / STRUCTURE_FILE, mmap_mode="r", allow_pickle=False)
            if STRUCTURE_FILE in manifest.files
            else None,
            width=np.load(path / WIDTH_FILE, mmap_mode="r", allow_pickle=False)
            if WIDTH_FILE in manifest.files
            else None,
            colour=np.load(path / COLOUR_FILE, mmap_mode="r", allow_pickle=False)
            if COLOUR_FILE in manifest.files
            else None,
        )
        exact = ExactVectors(path / EXACT_FILE) if EXACT_FILE in manifest.files else None
    except (RuntimeError, ValueError, OSError) as exc:
        raise IndexStoreError(
            f"cannot read index files in {path}: {exc}; rebuild with `geoloc index build`"
        ) from exc
    for fname, rows, dtype in (
        (STRUCTURE_FILE, points.structure, np.int8),
        (COLOUR_FILE, points.colour, np.uint8),
    ):
        try:
            check_rows(rows, manifest.count, dtype, fname)
        except IndexStoreError as exc:
            raise IndexStoreError(f"{path}: {exc}; rebuild the index") from exc
    if points.width is not None and points.width.shape != (manifest.count,):
        raise IndexStoreError(
            f"{path / WIDTH_FILE} holds {points.width.shape}, not one width for each of the "
            f"manifest's {manifest.count} rows; rebuild the index"
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
