"""Tests for index.store: publication, discovery, checksummed loading and search."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.store import (
    WEIGHTS_KEY,
    IndexStoreError,
    IndexWeightsError,
    LoadedIndex,
    PointTable,
    latest_version,
    list_indexes,
    load_index,
    publish_index,
)

DIM = 32


def unit_vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def points_for(n: int, seed: int = 1) -> PointTable:
    rng = np.random.default_rng(seed)
    latlon = np.stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)], axis=1)
    country = np.array(["FR", "", "JP", "BR"] * (n // 4 + 1), dtype="<U2")[:n]
    return PointTable(ids=np.arange(n, dtype=np.int64) * 7 + 3, latlon=latlon, country=country)


def publish(root: Path, n: int = 200, *, name: str = "gal", seed: int = 0, **kw) -> np.ndarray:
    x = unit_vectors(n, seed=seed)
    kw.setdefault("profile", "bluemarble")
    kw.setdefault("gallery_kind", "csv")
    kw.setdefault("h3_resolution", None)
    publish_index(root, name, x, points_for(n), **kw)
    return x


def brute_topk(q: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def test_round_trip(tmp_path: Path) -> None:
    x = unit_vectors(300)
    pts = points_for(300)
    m = publish_index(
        tmp_path,
        "h3-res2",
        x,
        pts,
        profile="bluemarble",
        gallery_kind="h3",
        h3_resolution=2,
        version="v1",
        extra={"land_mask": "roaring"},
    )
    vdir = tmp_path / "indexes" / "h3-res2" / "v1"
    assert (m.name, m.version, m.profile, m.dim, m.metric) == (
        "h3-res2",
        "v1",
        "bluemarble",
        32,
        "ip",
    )
    assert (m.factory, m.gallery_kind, m.h3_resolution, m.count) == ("Flat", "h3", 2, 300)
    assert m.extra["land_mask"] == "roaring"
    assert m.created_at.endswith("Z")
    assert set(m.files) == {"index.faiss", "ids.npy", "latlon.npy", "country.npy"}
    for fname, digest in m.files.items():
        assert hashlib.sha256((vdir / fname).read_bytes()).hexdigest() == digest
    on_disk = json.loads((vdir / "manifest.json").read_text())
    assert on_disk["files"] == m.files and on_disk["count"] == 300

    li = load_index(tmp_path, "h3-res2", profile="bluemarble", dim=DIM)
    assert isinstance(li, LoadedIndex)
    assert li.manifest == m and len(li) == 300 and li.path == vdir
    np.testing.assert_array_equal(li.points.ids, pts.ids)
    np.testing.assert_array_equal(li.points.latlon, pts.latlon)
    np.testing.assert_array_equal(li.points.country, pts.country)
    assert li.points.country.dtype == np.dtype("<U2")
    scores, rows = li.search(x[[5, 17, 299]], 3)
    np.testing.assert_array_equal(rows[:, 0], [5, 17, 299])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_allclose(li.vectors(np.array([5, 17])), x[[5, 17]])


def test_flat_search_matches_bruteforce(tmp_path: Path) -> None:
    x = publish(tmp_path, 500)
    q = unit_vectors(20, seed=9)
    scores, rows = load_index(tmp_path, "gal").search(q, 10)
    np.testing.assert_array_equal(rows, brute_topk(q, x, 10))
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, rows, axis=1), atol=1e-5)


def test_k_clipped_and_padding_with_mask(tmp_path: Path) -> None:
    publish(tmp_path, 50)
    li = load_index(tmp_path, "gal")
    q = unit_vectors(2, seed=3)
    scores, rows = li.search(q, 1000)
    assert rows.shape == (2, 50) and sorted(rows[0]) == list(range(50))
    allowed = np.zeros(50, dtype=bool)
    allowed[[4, 9]] = True
    scores, rows = li.search(q, 5, allowed=allowed)
    assert rows.shape == (2, 5)
    assert set(rows[0, :2]) == {4, 9} and (rows[:, 2:] == -1).all()
    assert np.isneginf(scores[:, 2:]).all()


@pytest.mark.parametrize(
    ("factory", "nprobe"), [("Flat", None), ("HNSW32", None), ("IVF16,Flat", 16), ("PQ8", None)]
)
def test_allowed_mask_never_returns_masked_rows(
    tmp_path: Path, factory: str, nprobe: int | None
) -> None:
    x = publish(tmp_path, 1000, factory=factory)
    li = load_index(tmp_path, "gal")
    allowed = np.random.default_rng(5).random(1000) < 0.3
    q = x[:40]  # includes rows that are masked out: they are each query's exact match
    _, rows = li.search(q, 20, allowed=allowed, nprobe=nprobe)
    got = rows[rows >= 0]
    assert got.size > 0 and allowed[got].all()
    _, unmasked = li.search(q, 20, nprobe=nprobe)
    assert not allowed[unmasked[unmasked >= 0]].all()  # the mask did something
    if factory in ("Flat", "IVF16,Flat"):  # exact (nprobe = all lists): equals a filtered brute
        sims = np.where(allowed[None, :], q @ x.T, -np.inf)
        np.testing.assert_array_equal(rows, np.argsort(-sims, axis=1, kind="stable")[:, :20])


def test_ivf_nprobe_changes_recall(tmp_path: Path) -> None:
    x = publish(tmp_path, 2000, factory="IVF16,Flat")
    li = load_index(tmp_path, "gal")
    q = unit_vectors(50, seed=11)
    truth = brute_topk(q, x, 10)
    _, full = li.search(q, 10, nprobe=16)
    _, one = li.search(q, 10, nprobe=1)
    np.testing.assert_array_equal(full, truth)
    assert (one != truth).any()


def test_all_scores_equals_matmul(tmp_path: Path) -> None:
    x = publish(tmp_path, 400)
    q = unit_vectors(7, seed=4)
    s = load_index(tmp_path, "gal").all_scores(q)
    assert s.shape == (7, 400) and s.dtype == np.float32
    np.testing.assert_allclose(s, q @ x.T, atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,Flat"])
def test_all_scores_covers_every_row_for_approximate_indexes(tmp_path: Path, factory: str) -> None:
    x = publish(tmp_path, 1000, factory=factory)
    q = unit_vectors(5, seed=4)
    s = load_index(tmp_path, "gal").all_scores(q)
    np.testing.assert_allclose(s, q @ x.T, atol=1e-5)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF16,PQ8"])
def test_other_factories_build_and_search(tmp_path: Path, factory: str) -> None:
    x = publish(tmp_path, 1000, factory=factory)
    li = load_index(tmp_path, "gal")
    assert li.manifest.factory == factory
    scores, rows = li.search(x[:50], 5, nprobe=16)
    assert rows.shape == (50, 5) and (rows >= 0).all()
    # Approximate, but a stored vector must find itself nearly always.
    assert (rows[:, 0] == np.arange(50)).mean() > 0.8
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # sorted best first
    assert li.vectors(np.arange(3)).shape == (3, DIM)


def test_refusals(tmp_path: Path) -> None:
    x = unit_vectors(300)
    pts = points_for(300)
    kw = {"profile": "bluemarble", "gallery_kind": "csv", "h3_resolution": None}
    with pytest.raises(IndexStoreError, match=r"(?s)Blah.*HNSW32"):
        publish_index(tmp_path, "gal", x, pts, factory="Blah", **kw)
    for bad in ["Bad", "../x", "", "-x", "a/b", "x" * 65]:
        with pytest.raises(IndexStoreError, match="invalid index name"):
            publish_index(tmp_path, bad, x, pts, **kw)
    nan = x.copy()
    nan[3, 1] = np.nan
    with pytest.raises(IndexStoreError, match="NaN"):
        publish_index(tmp_path, "gal", nan, pts, **kw)
    with pytest.raises(IndexStoreError, match="length mismatch"):
        publish_index(tmp_path, "gal", x[:299], pts, **kw)
    with pytest.raises(IndexStoreError, match="empty"):
        publish_index(tmp_path, "gal", x[:0], points_for(0), **kw)
    with pytest.raises(IndexStoreError, match="unit norm"):
        publish_index(tmp_path, "gal", x * 2, pts, **kw)
    swapped = PointTable(pts.ids, pts.latlon[:, ::-1] * 2, pts.country)
    with pytest.raises(IndexStoreError, match="latlon out of range"):
        publish_index(tmp_path, "gal", x, swapped, **kw)
    with pytest.raises(IndexStoreError, match="training"):
        publish_index(tmp_path, "gal", x[:10], points_for(10), factory="IVF64,Flat", **kw)
    assert list_indexes(tmp_path) == []
    with pytest.raises(IndexStoreError, match="no published index"):
        load_index(tmp_path, "gal")


def test_unknown_version_refused(tmp_path: Path) -> None:
    publish(tmp_path, version="v1")
    with pytest.raises(IndexStoreError, match=r"no published version 'v2'.*v1"):
        load_index(tmp_path, "gal", "v2")


@pytest.mark.parametrize("fname", ["index.faiss", "ids.npy"])
def test_flipped_byte_fails_checksum(tmp_path: Path, fname: str) -> None:
    publish(tmp_path, version="v1")
    path = tmp_path / "indexes" / "gal" / "v1" / fname
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the payload, so the file still parses
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(IndexStoreError, match=f"checksum mismatch for {fname}"):
        load_index(tmp_path, "gal")
    li = load_index(tmp_path, "gal", verify=False)  # no hashing: loads the changed file
    assert len(li) == 200


def test_profile_and_dim_mismatch_refused(tmp_path: Path) -> None:
    publish(tmp_path)
    with pytest.raises(IndexStoreError, match=r"'bluemarble'.*'geoclip'.*rebuild"):
        load_index(tmp_path, "gal", profile="geoclip")
    with pytest.raises(IndexStoreError, match=r"dimension 32.*512.*rebuild"):
        load_index(tmp_path, "gal", dim=512)
    assert len(load_index(tmp_path, "gal", profile="bluemarble", dim=DIM)) == 200


def test_index_built_with_other_weights_is_refused_with_how_to_rebuild(tmp_path: Path) -> None:
    publish(tmp_path, version="v1", extra={WEIGHTS_KEY: "aaaa1111aaaa1111"})
    publish(tmp_path, name="refs", version="v1", gallery_kind="images", extra={WEIGHTS_KEY: "a1"})
    (gallery,) = list_indexes(tmp_path, "gal")
    assert gallery.weights == "aaaa1111aaaa1111"
    assert len(load_index(tmp_path, "gal", weights="aaaa1111aaaa1111")) == 200
    with pytest.raises(IndexWeightsError) as err:
        load_index(tmp_path, "gal", profile="bluemarble", weights="bbbb2222bbbb2222")
    msg = str(err.value)
    assert "gal/v1 was built with model weights aaaa1111aaaa1111" in msg
    assert "bbbb2222bbbb2222" in msg and "`geoloc index build gal`" in msg
    assert "`geoloc setup`" in msg
    # A reference index names the command that rebuilds those.
    with pytest.raises(IndexStoreError, match=r"`geoloc images add TABLE --name refs`"):
        load_index(tmp_path, "refs", weights="b2")


def test_index_without_recorded_weights_loads_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish(tmp_path, version="v1")  # as every manifest before weights were recorded
    manifest = tmp_path / "indexes" / "gal" / "v1" / "manifest.json"
    assert WEIGHTS_KEY not in json.loads(manifest.read_text())["extra"]
    assert list_indexes(tmp_path, "gal")[0].weights is None
    with caplog.at_level("WARNING", logger="index.store"):
        li = load_index(tmp_path, "gal", profile="bluemarble", weights="bbbb2222bbbb2222")
    assert len(li) == 200
    (record,) = [r for r in caplog.records if r.name == "index.store"]
    assert record.levelname == "WARNING" and "gal/v1 records no model weights" in record.message
    assert "\n" not in record.message


def test_crash_before_rename_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*_a: object, **_k: object) -> None:
        raise OSError("simulated crash")

    with monkeypatch.context() as mp:
        mp.setattr(os, "rename", crash)
        with pytest.raises(OSError, match="simulated crash"):
            publish(tmp_path, version="v1")
    assert list_indexes(tmp_path) == []
    with pytest.raises(IndexStoreError):
        latest_version(tmp_path, "gal")
    # A hard crash leaves its temp dir (manifest and all) behind: still invisible.
    name_dir = tmp_path / "indexes" / "gal"
    stale = name_dir / ".tmp-v1-deadbeef"
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text("{}")
    (name_dir / "v0").mkdir()  # a version dir without a manifest is incomplete
    assert list_indexes(tmp_path) == []
    publish(tmp_path, version="v1")  # the rerun succeeds
    assert [m.version for m in list_indexes(tmp_path)] == ["v1"]
    assert [p.name for p in name_dir.iterdir() if p.name.startswith(".tmp-v1-")] == [stale.name]


def test_existing_version_refused(tmp_path: Path) -> None:
    publish(tmp_path, version="v1")
    before = (tmp_path / "indexes" / "gal" / "v1" / "manifest.json").read_bytes()
    with pytest.raises(IndexStoreError, match="already exists"):
        publish(tmp_path, version="v1", seed=3)
    assert (tmp_path / "indexes" / "gal" / "v1" / "manifest.json").read_bytes() == before


def test_latest_version_and_listing(tmp_path: Path) -> None:
    publish(tmp_path)
    time.sleep(0.002)
    publish(tmp_path)
    publish(tmp_path, name="other", version="zzz")
    time.sleep(0.002)
    publish(tmp_path, name="other", version="aaa")  # newer although it sorts first
    versions = [m.version for m in list_indexes(tmp_path, "gal")]
    assert len(versions) == 2 and versions == sorted(versions)
    assert latest_version(tmp_path, "gal") == versions[-1]
    assert load_index(tmp_path, "gal").manifest.version == versions[-1]
    assert latest_version(tmp_path, "other") == "aaa"
    listed = [(m.name, m.version) for m in list_indexes(tmp_path)]
    assert listed == [
        ("gal", versions[0]),
        ("gal", versions[1]),
        ("other", "aaa"),
        ("other", "zzz"),
    ]


def test_structure_descriptors_travel_with_the_points(tmp_path: Path) -> None:
    from dataclasses import replace

    from index.store import STRUCTURE_FILE

    n = 12
    desc = np.random.default_rng(2).integers(-127, 128, (n, 16), dtype=np.int8)
    m = publish_index(
        tmp_path,
        "refs",
        unit_vectors(n),
        replace(points_for(n), structure=desc),
        profile="p",
        gallery_kind="images",
        h3_resolution=None,
    )
    assert STRUCTURE_FILE in m.files
    idx = load_index(tmp_path, "refs")
    np.testing.assert_array_equal(np.asarray(idx.points.structure), desc)
    plain = publish_index(
        tmp_path,
        "plain",
        unit_vectors(n),
        points_for(n),
        profile="p",
        gallery_kind="images",
        h3_resolution=None,
    )
    assert STRUCTURE_FILE not in plain.files
    assert load_index(tmp_path, "plain").points.structure is None
    with pytest.raises(IndexStoreError, match="one row per vector"):
        publish_index(
            tmp_path,
            "bad",
            unit_vectors(n),
            replace(points_for(n), structure=desc[:5]),
            profile="p",
            gallery_kind="images",
            h3_resolution=None,
        )


def test_colour_thumbnails_travel_with_the_points(tmp_path: Path) -> None:
    """Thumbnails are stored row for row by both builders (one table, and in chunks), and
    a table of the wrong type is refused."""
    from dataclasses import replace

    from index.points import PointTable, VectorChunk
    from index.store import COLOUR_FILE, publish_index_chunked

    n = 40
    thumbs = np.random.default_rng(3).integers(0, 256, (n, 192), dtype=np.uint8)
    vectors = unit_vectors(n)
    m = publish_index(
        tmp_path,
        "refs",
        vectors,
        replace(points_for(n), colour=thumbs),
        profile="p",
        gallery_kind="images",
        h3_resolution=None,
    )
    assert COLOUR_FILE in m.files
    np.testing.assert_array_equal(np.asarray(load_index(tmp_path, "refs").points.colour), thumbs)

    whole = points_for(n)

    def chunks():
        # The first chunk has no thumbnails: its rows stay zero (unknown).
        for rows, colour in ((slice(0, 15), None), (slice(15, n), thumbs[15:])):
            part = PointTable(whole.ids[rows], whole.latlon[rows], whole.country[rows])
            yield VectorChunk(vectors[rows], replace(part, colour=colour))

    chunked = publish_index_chunked(
        tmp_path,
        "chunked",
        chunks,
        count=n,
        dim=vectors.shape[1],
        train_vectors=vectors,
        factory="Flat",
        profile="p",
        gallery_kind="images",
    )
    assert COLOUR_FILE in chunked.files
    stored = np.asarray(load_index(tmp_path, "chunked").points.colour)
    assert not stored[:15].any()
    np.testing.assert_array_equal(stored[15:], thumbs[15:])
    with pytest.raises(IndexStoreError, match="uint8"):
        publish_index(
            tmp_path,
            "bad",
            vectors,
            replace(points_for(n), colour=thumbs.astype(np.int16)),
            profile="p",
            gallery_kind="images",
            h3_resolution=None,
        )


def publish_images(root: Path, name: str, n: int, structure: np.ndarray | None = None):
    """A reference-image index of n random vectors (with these structure descriptors)."""
    from dataclasses import replace

    points = replace(points_for(n), structure=structure)
    return publish_index(
        root, name, unit_vectors(n), points, profile="p", gallery_kind="images", h3_resolution=None
    )


def test_search_colour_finds_the_colours_without_the_embedding(tmp_path: Path) -> None:
    from dataclasses import replace

    from encoders.structure import colour_thumbnails
    from index.search import colour_codes

    rng = np.random.default_rng(4)
    pics = [
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((32, 32))
        for _ in range(40)
    ]
    thumbs = colour_thumbnails(pics)
    thumbs[7] = 0  # a reference stored without a thumbnail
    n = len(pics)
    points = replace(points_for(n), colour=thumbs)
    published = publish_index(
        tmp_path,
        "refs",
        unit_vectors(n),
        points,
        profile="p",
        gallery_kind="images",
        h3_resolution=None,
    )
    idx = load_index(tmp_path, published.name)
    # The same colours, the texture smeared (as a heavy JPEG or blur leaves them).
    smeared = [pics[i].resize((8, 8)).resize((32, 32), Image.Resampling.BILINEAR) for i in (3, 20)]
    rows = idx.search_colour(colour_thumbnails(smeared), 2)
    assert rows.shape == (2, 2) and rows[:, 0].tolist() == [3, 20]
    allowed = np.ones(n, dtype=bool)
    allowed[3] = False
    assert 3 not in idx.search_colour(colour_thumbnails(smeared[:1]), 5, allowed=allowed)
    # A reference without a thumbnail is never found: not by a black picture, not as filler.
    black = np.full((1, 192), 2, np.uint8)
    assert 7 not in idx.search_colour(black, 5)
    few = np.zeros(n, dtype=bool)
    few[[1, 2, 7]] = True
    assert idx.search_colour(thumbs[:1], 3, allowed=few)[0].tolist()[2] == -1
    assert idx.search_colour(thumbs[:0], 3).shape == (0, 3)
    # A code is the mean of 2 x 2 cells, a quarter of the numbers.
    assert colour_codes(thumbs[:1]).shape == (1, 48)
    assert colour_codes(thumbs[:1])[0, :3] == pytest.approx(
        thumbs[0].reshape(8, 8, 3)[:2, :2].reshape(-1, 3).mean(axis=0)
    )
    with pytest.raises(IndexStoreError, match="shape"):
        idx.search_colour(thumbs[:, :48], 1)
    with pytest.raises(IndexStoreError, match="no colour thumbnails"):
        load_index(tmp_path, publish_images(tmp_path, "plain", n).name).search_colour(thumbs, 1)


def test_search_structure_finds_the_layout_without_the_embedding(tmp_path: Path) -> None:
    from encoders.structure import structure_descriptors

    rng = np.random.default_rng(3)
    pics = [Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)) for _ in range(40)]
    desc = structure_descriptors(pics)
    desc[7] = 0  # a reference never described
    n = len(pics)
    idx = load_index(tmp_path, publish_images(tmp_path, "refs", n, desc).name)
    # The same layouts, darker and hazier: ranks keep, the pixel values do not.
    hazy = [Image.eval(pics[i], lambda v: 60 + v // 3) for i in (3, 20)]
    rows = idx.search_structure(structure_descriptors(hazy), 2)
    assert rows.shape == (2, 2) and rows[:, 0].tolist() == [3, 20]
    allowed = np.ones(n, dtype=bool)
    allowed[3] = False
    assert 3 not in idx.search_structure(structure_descriptors(hazy[:1]), 5, allowed=allowed)
    assert 7 not in idx.search_structure(desc[8:30], 1)  # all-zero row: nobody's match
    with pytest.raises(IndexStoreError, match="shape"):
        idx.search_structure(desc[:, :64], 1)
    with pytest.raises(IndexStoreError, match="bool mask"):
        idx.search_structure(desc[:1], 1, allowed=np.ones(3, dtype=bool))
    publish_images(tmp_path, "plain", n)
    with pytest.raises(IndexStoreError, match="no structure descriptors"):
        load_index(tmp_path, "plain").search_structure(desc[:1], 1)
