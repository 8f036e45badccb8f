"""Compressed indexes: trained on a sample, filled chunk by chunk, merged on disk, mmapped."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from index.store import (
    EXACT_FILE,
    ONDISK_FILE,
    QUANTIZER_EF,
    IndexStoreError,
    PointTable,
    VectorChunk,
    compressed_factory,
    ivf_params,
    load_index,
    publish_index_chunked,
    recall_1_at_k,
    select_device,
)

DIM = 32
N = 12_000
CHUNK = 5_000  # the last chunk is short on purpose
FACTORY = "IVF64_HNSW32,PQ16"


def _clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(200, DIM))
    x = centres[rng.integers(0, 200, n)] + 0.9 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


VECS = _clustered(N, 0)


def _chunks() -> Iterator[VectorChunk]:
    for start in range(0, N, CHUNK):
        x = VECS[start : start + CHUNK]
        n = len(x)
        latlon = np.column_stack([np.linspace(-60, 60, n), np.linspace(-170, 170, n)])
        yield VectorChunk(
            x, PointTable(np.arange(start, start + n) + 1000, latlon, np.full(n, "FR", "<U2"))
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("compressed")
    m = publish_index_chunked(
        root,
        "refs",
        _chunks,
        count=N,
        dim=DIM,
        train_vectors=VECS[::3],
        profile="bluemarble",
        gallery_kind="images",
        factory=FACTORY,
        nprobe=8,
        recall_queries=150,
        device="cpu",
        rerank_k=RERANK,
    )
    return root, m


RERANK = 64


def _exact(q: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ VECS.T), axis=1)[:, :10]


def test_inverted_lists_live_on_disk_and_are_checksummed(built):
    root, m = built
    vdir = root / "indexes" / "refs" / m.version
    assert (vdir / ONDISK_FILE).stat().st_size > 0
    assert ONDISK_FILE in m.files
    assert m.factory == FACTORY and m.count == N
    assert m.extra["on_disk"] is True
    assert EXACT_FILE in m.files and m.extra["rerank_k"] == RERANK
    # No block files or temporary directories are left behind.
    assert sorted(p.name for p in vdir.iterdir()) == sorted([*m.files, "manifest.json"])
    assert not list((root / "indexes" / "refs").glob(".tmp-*"))
    # The version directory was renamed after the build: the lists are found beside the index.
    idx = load_index(root, "refs", m.version)
    assert len(idx) == N
    np.testing.assert_array_equal(np.asarray(idx.points.ids[:3]), [1000, 1001, 1002])


def test_search_finds_the_exact_neighbours_and_nprobe_is_per_request(built):
    root, _ = built
    idx = load_index(root, "refs")
    queries = _clustered(200, 7)
    exact = _exact(queries)
    _, few = idx.search(queries, 10, nprobe=1, rerank_k=0)
    _, default = idx.search(queries, 10, rerank_k=0)
    _, many = idx.search(queries, 10, nprobe=64, rerank_k=0)
    # Without nprobe the index searches as many lists as its manifest's recall was measured at.
    np.testing.assert_array_equal(default, idx.search(queries, 10, nprobe=8, rerank_k=0)[1])
    r1, r64 = recall_1_at_k(few, exact), recall_1_at_k(many, exact)
    assert r1 < r64
    assert r64 >= 0.85
    with pytest.raises(IndexStoreError, match="nprobe"):
        idx.search(queries, 10, nprobe=0)


def test_manifest_records_the_measured_recall(built):
    root, m = built
    assert m.extra["recall_nprobe"] == 8
    assert m.extra["recall_queries"] == 150
    # Recompute it independently over all vectors (same protocol: gallery vectors as
    # queries, each excluded from its own answer) on a different sample.
    idx = load_index(root, "refs")
    rows = np.random.default_rng(5).choice(N, 150, replace=False)
    q = VECS[rows]
    s = q @ VECS.T
    s[np.arange(len(rows)), rows] = -np.inf
    exact = np.argsort(-s, axis=1)[:, :10]
    _, found = idx.search(q, 11, nprobe=8)  # the index's own re-ranking depth
    found = np.array([[r for r in f if r != own][:10] for f, own in zip(found, rows, strict=True)])
    assert abs(recall_1_at_k(found, exact) - m.extra["recall_at_10"]) < 0.12
    assert 0.5 < m.extra["recall_at_10"] <= 1.0
    assert m.extra["recall_rerank_k"] == RERANK


def test_exact_reranking_lifts_recall_past_the_codes(built):
    root, _ = built
    idx = load_index(root, "refs")
    assert idx.exact is not None and idx.exact.shape == (N, DIM)
    # The defaults a search uses when it names neither: the manifest's.
    assert idx.nprobe == 8 and idx.rerank_k == RERANK
    queries = _clustered(300, 11)
    exact = _exact(queries)
    # Every list probed: what is still wrong is the codes' ranking, which re-ranking fixes:
    # the exact nearest neighbour comes first, and the top 10 are the exact top 10.
    codes_s, codes = idx.search(queries, 10, nprobe=64, rerank_k=0)
    rer_s, rer = idx.search(queries, 10, nprobe=64, rerank_k=RERANK)

    def first_right(found: np.ndarray) -> float:
        return float((found[:, 0] == exact[:, 0]).mean())

    def overlap(found: np.ndarray) -> float:
        return float(
            np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
        )

    assert first_right(rer) >= 0.99 and first_right(codes) < 0.9
    assert overlap(rer) >= 0.99 and overlap(codes) < 0.9
    assert recall_1_at_k(rer, exact) >= recall_1_at_k(codes, exact)
    # The default is the manifest's depth; a deeper one finds at least as much.
    np.testing.assert_array_equal(idx.search(queries, 10, nprobe=64)[1], rer)
    deeper = recall_1_at_k(idx.search(queries, 10, nprobe=64, rerank_k=400)[1], exact)
    assert deeper >= recall_1_at_k(rer, exact)
    # Re-ranked scores are exact inner products (float16 vectors), best first.
    want = np.einsum("qkd,qd->qk", VECS[rer], queries)
    np.testing.assert_allclose(rer_s, want, atol=2e-3)
    assert (np.diff(rer_s, axis=1) <= 0).all()
    assert np.abs(codes_s - np.einsum("qkd,qd->qk", VECS[codes], queries)).max() > 5e-3
    # Stored vectors come from the exact copy, not decoded from the codes.
    np.testing.assert_allclose(
        idx.vectors(np.array([0, 4999, N - 1])), VECS[[0, 4999, N - 1]], atol=1e-3
    )
    with pytest.raises(IndexStoreError, match="rerank_k must be >= 0"):
        idx.search(queries, 10, rerank_k=-1)


def test_reranking_keeps_the_allowed_mask(built):
    root, _ = built
    idx = load_index(root, "refs")
    allowed = np.random.default_rng(2).random(N) < 0.2
    queries = VECS[:50]  # each query's own row is masked out for most of them
    _, rows = idx.search(queries, 10, nprobe=64, allowed=allowed)
    assert (rows >= 0).all() and allowed[rows].all()
    sims = np.where(allowed[None, :], queries @ VECS.T, -np.inf)
    best = np.argsort(-sims, axis=1)[:, :10]
    assert recall_1_at_k(rows, best) >= 0.98


@pytest.mark.parametrize(("fname", "offset"), [(ONDISK_FILE, 100), (EXACT_FILE, -3)])
def test_a_changed_data_file_is_refused(built, tmp_path, fname, offset):
    root, m = built
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = copy / "indexes" / "refs" / m.version / fname
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match=f"checksum mismatch for {re.escape(fname)}"):
        load_index(copy, "refs", m.version)


def test_chunks_must_add_up(tmp_path):
    with pytest.raises(IndexStoreError, match="expected 13000"):
        publish_index_chunked(
            tmp_path,
            "refs",
            _chunks,
            count=N + 1000,
            dim=DIM,
            train_vectors=VECS[::3],
            profile="bluemarble",
            gallery_kind="images",
            factory=FACTORY,
            recall_queries=0,
        )
    assert not list((tmp_path / "indexes" / "refs").glob(".tmp-*"))


def test_non_ivf_factories_are_filled_in_memory(tmp_path):
    m = publish_index_chunked(
        tmp_path,
        "flat",
        _chunks,
        count=N,
        dim=DIM,
        train_vectors=VECS[:100],
        profile="bluemarble",
        gallery_kind="images",
        factory="Flat",
        rerank_k=100,  # meaningless for an exact index: no vectors file is kept
    )
    assert ONDISK_FILE not in m.files and "recall_at_10" not in m.extra
    assert EXACT_FILE not in m.files and m.extra["rerank_k"] == 0
    idx = load_index(tmp_path, "flat")
    q = _clustered(20, 3)
    np.testing.assert_array_equal(idx.search(q, 10)[1], _exact(q))


def test_compressed_factory_scales_the_lists_with_the_gallery():
    assert compressed_factory(1_000_000, 512) == "IVF4096_HNSW32,PQ128"
    assert compressed_factory(10_000_000, 512) == "IVF16384_HNSW32,PQ128"
    assert compressed_factory(5_000, 256) == "IVF1024_HNSW32,PQ64"
    assert compressed_factory(10**9, 768) == "IVF65536_HNSW32,PQ192"


def test_device_selection_uses_a_gpu_only_when_there_is_one():
    assert select_device("auto", gpus=0) == "cpu"
    assert select_device("auto", gpus=2) == "gpu"
    assert select_device("cpu", gpus=2) == "cpu"
    assert select_device("gpu", gpus=1) == "gpu"
    with pytest.raises(IndexStoreError, match="faiss sees no GPU"):
        select_device("gpu", gpus=0)
    with pytest.raises(IndexStoreError, match="unknown faiss device"):
        select_device("tpu", gpus=0)
    # This machine's faiss (faiss-cpu here) decides 'auto' by its own GPU count.
    assert select_device("auto") in ("cpu", "gpu")


def test_hnsw_coarse_quantizer_finds_the_nearest_lists(built):
    """The lists a search probes are the nearest centroids: the HNSW graph over them is searched
    with ``QUANTIZER_EF`` candidates, not faiss's default of 16, which misses some."""
    gen = np.random.default_rng(3)
    dim, nlist, nprobe = 64, 4096, 64
    centroids = _unit(gen.normal(size=(nlist, dim)))
    quantizer = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    queries = _unit(centroids[gen.integers(0, nlist, 300)] + 0.5 * gen.normal(size=(300, dim)))
    exact = np.argsort(-(queries @ centroids.T), axis=1)[:, :nprobe]

    def found(params: faiss.SearchParameters | None) -> float:
        _, lists = quantizer.search(queries, nprobe, params=params)
        return np.mean([len(set(a) & set(b)) / nprobe for a, b in zip(lists, exact, strict=True)])

    params = ivf_params(ivf, nprobe)
    assert params.nprobe == nprobe and params.hnsw_params.efSearch == QUANTIZER_EF
    default = found(None)
    tuned = found(params.hnsw_params)
    print(f"\nnearest {nprobe} of {nlist} lists found: {default:.3f} (efSearch 16), {tuned:.3f}")
    assert tuned >= 0.98 and tuned > default + 0.02
    # The store's searches go through the same parameters, at the index's nprobe or the asked one.
    idx = load_index(built[0], "refs")
    assert idx._params(None, None).hnsw_params.efSearch == QUANTIZER_EF
    asked = idx._params(None, 200)  # at most the index's 64 lists
    assert asked.nprobe == 64 and asked.hnsw_params.efSearch == QUANTIZER_EF


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
