"""Compressed indexes: trained on a sample, filled chunk by chunk, merged on disk, mmapped."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.store import (
    ONDISK_FILE,
    IndexStoreError,
    PointTable,
    VectorChunk,
    compressed_factory,
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
    )
    return root, m


def _exact(q: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ VECS.T), axis=1)[:, :10]


def test_inverted_lists_live_on_disk_and_are_checksummed(built):
    root, m = built
    vdir = root / "indexes" / "refs" / m.version
    assert (vdir / ONDISK_FILE).stat().st_size > 0
    assert ONDISK_FILE in m.files
    assert m.factory == FACTORY and m.count == N
    assert m.extra["on_disk"] is True
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
    _, few = idx.search(queries, 10, nprobe=1)
    _, default = idx.search(queries, 10)
    _, many = idx.search(queries, 10, nprobe=64)
    # Without nprobe the index searches as many lists as its manifest's recall was measured at.
    np.testing.assert_array_equal(default, idx.search(queries, 10, nprobe=8)[1])
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
    _, found = idx.search(q, 11, nprobe=8)
    found = np.array([[r for r in f if r != own][:10] for f, own in zip(found, rows, strict=True)])
    assert abs(recall_1_at_k(found, exact) - m.extra["recall_at_10"]) < 0.12
    assert 0.5 < m.extra["recall_at_10"] <= 1.0


def test_a_changed_lists_file_is_refused(built, tmp_path):
    root, m = built
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    lists = copy / "indexes" / "refs" / m.version / ONDISK_FILE
    data = bytearray(lists.read_bytes())
    data[100] ^= 0xFF
    lists.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match=r"checksum mismatch for index\.ivfdata"):
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
    )
    assert ONDISK_FILE not in m.files and "recall_at_10" not in m.extra
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
