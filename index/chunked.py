"""Large indexes: compressed, trained on a sample, filled chunk by chunk, merged on disk."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.build import check_publication, finish_publication, save_npy
from index.exact import ExactVectors, exact_top_k, recall_1_at_k, rerank, write_exact_header
from index.faiss_helpers import (
    clone_empty,
    ivf_of,
    ivf_params,
    make_index,
    select_device,
    to_gpu_training,
    train_index,
)
from index.files import fsync_file
from index.manifest import (
    COLOUR_FILE,
    COUNTRY_FILE,
    DATA_FILES,
    EXACT_FILE,
    IDS_FILE,
    INDEX_FILE,
    LATLON_FILE,
    ONDISK_FILE,
    STRUCTURE_FILE,
    WIDTH_FILE,
    IndexStoreError,
    Manifest,
)
from index.points import VectorChunk, check_points, check_vectors

__all__ = ["compressed_factory", "publish_index_chunked"]


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
    final_dir, version, extra = check_publication(
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
    train = check_vectors(train_vectors)
    if train.shape[1] != dim:
        raise IndexStoreError(f"training vectors have dimension {train.shape[1]}, not {dim}")
    trained = make_index(dim, factory)
    if device == "gpu":
        to_gpu_training(trained)
    train_index(trained, train, factory)
    t_train = time.perf_counter()
    ivf = ivf_of(trained)
    if ivf is not None:
        ivf.clustering_index = None

    rng = np.random.default_rng(seed)
    n_recall = min(int(recall_queries), count - 1) if factory != "Flat" else 0
    recall_rows = np.sort(rng.choice(count, size=n_recall, replace=False)) if n_recall else None
    recall_q = np.zeros((n_recall, dim), dtype=np.float32)
    ids = np.empty(count, dtype=np.int64)
    latlon = np.empty((count, 2), dtype=np.float64)
    country = np.empty(count, dtype="<U2")
    # Row-aligned descriptors (PointTable field -> file), on disk, each opened at the first
    # chunk that has some; zero rows (unknown) until filled.
    described = {"structure": STRUCTURE_FILE, "colour": COLOUR_FILE}
    rows_out: dict[str, np.ndarray] = {}
    width = np.full(count, np.nan, dtype=np.float32)
    has_width = False

    name_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = name_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    exact_fh = (tmp_dir / EXACT_FILE).open("wb") if rerank_k else None
    try:
        if exact_fh is not None:
            write_exact_header(exact_fh, count, dim)
        blocks: list[Path] = []
        whole = trained if ivf is None else None
        start = 0
        for chunk in chunks():
            vecs = check_vectors(chunk.vectors)
            n = len(vecs)
            if vecs.shape[1] != dim or start + n > count:
                raise IndexStoreError(
                    f"chunk at row {start} has shape {vecs.shape}: expected dimension {dim} "
                    f"and {count} rows in all"
                )
            table = check_points(chunk.points, n)
            ids[start : start + n] = table.ids
            latlon[start : start + n] = table.latlon
            country[start : start + n] = table.country
            for field, fname in described.items():
                got = getattr(table, field)
                if got is None:
                    continue
                if field not in rows_out:
                    rows_out[field] = np.lib.format.open_memmap(
                        tmp_dir / fname, "w+", got.dtype, (count, got.shape[1])
                    )
                if got.shape[1] != rows_out[field].shape[1]:
                    raise IndexStoreError(
                        f"chunk at row {start} has {field} rows of width {got.shape[1]}, "
                        f"earlier chunks {rows_out[field].shape[1]}"
                    )
                rows_out[field][start : start + n] = got
            if table.width is not None:  # stored only where some width is known
                width[start : start + n] = table.width
                has_width |= bool(np.isfinite(table.width).any())
            if recall_rows is not None:
                sel = (recall_rows >= start) & (recall_rows < start + n)
                recall_q[sel] = vecs[recall_rows[sel] - start]
            if exact_fh is not None:
                exact_fh.write(vecs.astype(np.float16).tobytes())
            if whole is not None:
                whole.add(vecs)
            else:
                block = clone_empty(trained)
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
        whole_ivf = ivf_of(whole)
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
        while rows_out:  # flushed and unmapped
            rows_out.popitem()[1].flush()
        written = (ONDISK_FILE, EXACT_FILE, *described.values())
        data_files = [*DATA_FILES, *(f for f in written if (tmp_dir / f).exists())]
        for f in data_files:
            if f in (INDEX_FILE, *written):
                fsync_file(tmp_dir / f)
        save_npy(tmp_dir / IDS_FILE, ids)
        save_npy(tmp_dir / LATLON_FILE, latlon)
        save_npy(tmp_dir / COUNTRY_FILE, country)
        if has_width:
            save_npy(tmp_dir / WIDTH_FILE, width)
            data_files.append(WIDTH_FILE)
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
        manifest = finish_publication(
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
        rows_out.clear()  # unmap before the directory goes
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _merge_blocks(trained: faiss.Index, blocks: list[Path], ivfdata: Path) -> faiss.Index:
    """One index whose inverted lists, merged from the block files, live in ``ivfdata``."""
    # Not faiss.contrib.ondisk.merge_ondisk: it leaks the blocks' lists (their files stay mapped).
    index = clone_empty(trained)
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
    ivf = ivf_of(index)
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
