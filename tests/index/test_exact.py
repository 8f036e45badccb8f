"""index.exact: exact top-k over chunks (faiss.contrib's knn_ground_truth underneath)."""

from __future__ import annotations

import numpy as np

from index.exact import exact_top_k


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_top_k_is_the_inner_product_ranking_over_all_chunks() -> None:
    gallery, queries = _unit(1003, 16, 0), _unit(40, 16, 1)
    want = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    for size in (1003, 100, 7, 3):  # one chunk; several; chunks shorter than k
        chunks = [gallery[i : i + size] for i in range(0, len(gallery), size)]
        got = exact_top_k(queries, chunks, 10)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_exact_top_k_excludes_each_querys_own_row() -> None:
    gallery = _unit(500, 16, 2)
    own = np.array([0, 7, 250, 499])
    s = gallery[own] @ gallery.T
    s[np.arange(len(own)), own] = -np.inf
    want = np.argsort(-s, axis=1)[:, :10]
    chunks = [gallery[i : i + 64].astype(np.float16) for i in range(0, 500, 64)]
    got = exact_top_k(gallery[own], chunks, 10, own)
    assert not (got == own[:, None]).any()
    # float16 chunks are compared in float32, like the rows they came from
    s16 = gallery[own] @ np.concatenate(chunks).astype(np.float32).T
    s16[np.arange(len(own)), own] = -np.inf
    np.testing.assert_array_equal(got, np.argsort(-s16, axis=1)[:, :10])
    assert (got[:, 0] == want[:, 0]).all()


def test_exact_top_k_pads_missing_results() -> None:
    gallery = _unit(4, 8, 3)
    got = exact_top_k(gallery[:2], [gallery[:1], gallery[1:]], 6)
    assert (got[:, 4:] == -1).all() and sorted(got[0, :4].tolist()) == [0, 1, 2, 3]
    got = exact_top_k(gallery[:2], [gallery], 6, np.array([0, 1]))
    assert (got[:, 3:] == -1).all()
    assert 0 not in got[0].tolist() and 1 not in got[1].tolist()
