"""Exact inner products: the float16 vectors a compressed index keeps on disk
(``EXACT_FILE``), re-ranking candidates with them, and exact top-k for recall."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from index.manifest import IndexStoreError

__all__ = ["ExactVectors", "exact_top_k", "recall_1_at_k", "rerank", "write_exact_header"]


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


def write_exact_header(fh: Any, count: int, dim: int) -> None:
    """The .npy header of ``EXACT_FILE`` for ``count`` float16 rows of ``dim``."""
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


def exact_top_k(
    queries: np.ndarray, chunks: Iterable[np.ndarray], k: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Rows of the exact top-k inner products over vectors given chunk by chunk (q, k).

    ``exclude``: one row per query that it must not find (a query drawn from the gallery
    must not find itself). Missing results (fewer than k rows) are -1.
    """
    # knn_ground_truth cannot leave a row out: look one deeper and drop the query's own row.
    extra = 0 if exclude is None else 1
    _, rows = knn_ground_truth(
        np.ascontiguousarray(queries, dtype=np.float32),
        (np.ascontiguousarray(chunk, dtype=np.float32) for chunk in chunks),
        k + extra,
        metric_type=faiss.METRIC_INNER_PRODUCT,
        ngpu=0,
    )
    if exclude is None:
        return rows
    own = rows == np.asarray(exclude, dtype=np.int64)[:, None]
    keep = np.argsort(own, axis=1, kind="stable")[:, :k]  # own row last, the rest in order
    return np.take_along_axis(rows, keep, axis=1)


def recall_1_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Share of queries whose exact nearest neighbour is among the found rows."""
    return float((found == exact[:, :1]).any(axis=1).mean())
