"""faiss helpers shared by building and searching: factories, training, IVF search
parameters, devices and reading index files."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from index.manifest import ONDISK_FILE, IndexStoreError

__all__ = [
    "ADD_CHUNK",
    "DEVICES",
    "QUANTIZER_EF",
    "clone_empty",
    "gpu_count",
    "is_hnsw",
    "ivf_of",
    "ivf_params",
    "make_index",
    "read_faiss",
    "select_device",
    "to_gpu_training",
    "train_index",
]

#: Rows added to an index (or scored) at a time.
ADD_CHUNK = 65_536
_FACTORY_EXAMPLES = '"Flat" (exact), "HNSW32" (graph), "IVF1024,PQ64" (compressed)'
DEVICES = ("auto", "cpu", "gpu")


def make_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index made by ``factory``; a bad factory is an IndexStoreError."""
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
    ivf = ivf_of(index)
    if ivf is not None:
        parts.append(faiss.downcast_index(ivf))
    for part in parts:
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF index inside ``index``, or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # faiss raises when there is no IVF inside
        return None


def is_hnsw(index: faiss.Index) -> bool:
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
    if is_hnsw(ivf.quantizer):
        quantizer = faiss.SearchParametersHNSW()
        quantizer.efSearch = max(QUANTIZER_EF, 2 * nprobe)
        params.quantizer_params = quantizer
        params.hnsw_params = quantizer  # kept alive here: faiss holds a raw pointer to it
    return params


def train_index(index: faiss.Index, sample: np.ndarray, factory: str) -> None:
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


def clone_empty(trained: faiss.Index) -> faiss.Index:
    """A copy of a trained, still empty index."""
    return faiss.deserialize_index(faiss.serialize_index(trained))


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


def to_gpu_training(index: faiss.Index) -> None:
    # k-means of the coarse quantizer is the slow part of training: run it on the GPUs.
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))


def read_faiss(path: Path) -> faiss.Index:
    """Read a published index file read-only: its lists on disk or memory-mapped."""
    if (path.parent / ONDISK_FILE).is_file():
        # Inverted lists on disk (mmapped by faiss): the index file names the lists file by
        # the path it was built at, so look for it beside the index file instead.
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        # Not every index type can be memory-mapped; a normal read is correct, just uses RAM.
        return faiss.read_index(str(path))
