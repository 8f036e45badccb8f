"""The locate pipeline on a real GPS tower (GeoCLIP's weights) and an H3 gallery built here.

Queries are GPS-tower embeddings of known points: what a perfect image tower would
produce for a photo taken there. That isolates what each stage does.
"""

from dataclasses import replace

import h3
import numpy as np
import pytest

from index.gallery import encode_gallery, h3_gallery
from index.geo import BBox, haversine_km, latlon_to_cells
from index.geocode import ReverseGeocoder
from index.store import PointTable, load_index, publish_index
from service.engine.locator import Locator
from service.engine.options import LocateOptions
from service.errors import InvalidOptionError

TRUTHS = np.array(
    [
        [48.60, 2.90],  # Île-de-France
        [35.40, 139.20],  # near Tokyo
        [-23.20, -46.10],  # São Paulo state
        [40.10, -104.70],  # Colorado
        [-1.10, 36.60],  # Kenya
        [27.60, 77.90],  # Uttar Pradesh
    ]
)


@pytest.fixture(scope="module")
def locator(geoclip_heads, tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    gallery = h3_gallery(2, land_only=True)
    vectors = encode_gallery(gallery, geoclip_heads.embed_gps, 512, progress=False)
    geocoder = ReverseGeocoder()
    points = PointTable(
        ids=gallery.ids, latlon=gallery.latlon, country=geocoder.country_codes(gallery.latlon)
    )
    publish_index(
        root, "res2", vectors, points, profile="geoclip", gallery_kind="h3", h3_resolution=2
    )
    return Locator(geoclip_heads, load_index(root, "res2"), geocoder)


def top1(results):
    return np.array([[r.candidates[0].lat, r.candidates[0].lon] for r in results])


def dist(a, b):
    return haversine_km(a[:, 0], a[:, 1], b[:, 0], b[:, 1])


def queries(loc):
    return loc.model.embed_gps(TRUTHS)


def test_retrieve_finds_the_cell_of_each_point(locator):
    # GeoCLIP's GPS space is not smooth at the scale of res-2 cells (~160 km edges), so the
    # point's own cell is among the first few hits rather than always the first.
    _scores, rows = locator.index.search(queries(locator), 16)
    own = latlon_to_cells(TRUTHS, 2)
    for i in range(len(TRUTHS)):
        assert own[i] in locator.index.points.ids[rows[i]]
    opts = LocateOptions(refine=False, diversify=False)
    d = dist(top1(locator.locate_embeddings(queries(locator), opts)), TRUTHS)
    assert np.median(d) < 250 and d.max() < 600, d


def test_refinement_moves_top1_closer_than_the_gallery_point(locator):
    base = dist(
        top1(
            locator.locate_embeddings(
                queries(locator), LocateOptions(refine=False, diversify=False)
            )
        ),
        TRUTHS,
    )
    refined_results = locator.locate_embeddings(queries(locator), LocateOptions(refine_levels=3))
    refined = dist(top1(refined_results), TRUTHS)
    assert all(r.candidates[0].source == "refined" for r in refined_results)
    # Each refined top-1 that starts in the truth's own cell ends closer than the
    # gallery cell centre it descended from (inside a wrong cell there is nothing to find).
    improved = 0
    for r, truth, d in zip(refined_results, TRUTHS, refined, strict=True):
        c = r.candidates[0]
        start = h3.cell_to_parent(h3.latlng_to_cell(c.lat, c.lon, 5), 2)
        if start == h3.latlng_to_cell(*truth, 2):
            assert d < haversine_km(*truth, *h3.cell_to_latlng(start))
            improved += 1
    assert improved >= 3
    # ... and overall far closer than retrieval alone.
    assert np.median(refined) < 0.2 * np.median(base), (refined, base)


def test_bbox_filter_never_returns_a_point_outside(locator):
    box = BBox(south=35.0, west=-10.0, north=60.0, east=30.0)  # Europe; Tokyo is outside
    for r in locator.locate_embeddings(queries(locator), LocateOptions(top_k=10, bbox=box)):
        pts = np.array([[c.lat, c.lon] for c in r.candidates])
        assert len(pts) and box.contains(pts).all()


def test_country_filter_never_returns_a_point_outside(locator):
    opts = LocateOptions(top_k=10, countries=("BR", "AR"))
    for r in locator.locate_embeddings(queries(locator), opts):
        assert r.candidates
        codes = locator.geocoder.country_codes(np.array([[c.lat, c.lon] for c in r.candidates]))
        assert set(codes) <= {"BR", "AR"}, codes
        assert all(c.country_code in ("BR", "AR") for c in r.candidates)


def test_each_stage_can_be_switched_off_and_the_result_says_which_ran(locator):
    q = queries(locator)[:1]
    full = locator.locate_embeddings(q, LocateOptions())[0]
    assert full.stages == ["retrieve", "refine", "verify", "diversify", "describe"]
    bare = locator.locate_embeddings(
        q, LocateOptions(refine=False, diversify=False, verify=False, describe=False)
    )[0]
    assert bare.stages == ["retrieve"]
    assert bare.candidates[0].country is None
    assert set(full.timings_ms) >= {"retrieve", "refine", "verify", "diversify", "describe"}


def test_diversify_keeps_distinct_places_and_merges_their_mass(locator):
    q = queries(locator)[:1]
    plain = locator.locate_embeddings(q, LocateOptions(top_k=10, diversify=False))[0]
    nms = locator.locate_embeddings(q, LocateOptions(top_k=10, nms_km=300))[0]
    pts = np.array([[c.lat, c.lon] for c in nms.candidates])
    d = haversine_km(pts[:, None, 0], pts[:, None, 1], pts[None, :, 0], pts[None, :, 1])
    assert (d[np.triu_indices(len(pts), 1)] > 300).all()
    assert nms.candidates[0].probability >= plain.candidates[0].probability


def test_describe_region_and_countries(locator):
    r = locator.locate_embeddings(queries(locator)[:1], LocateOptions())[0]
    c = r.candidates[0]
    assert c.country_code == "FR" and c.country == "France"
    assert c.h3 and isinstance(c.h3, str)
    assert r.countries[0]["country_code"] == "FR"
    assert abs(sum(x["probability"] for x in r.countries) - 1) < 1e-6
    assert r.region["covered"] >= 0.9 and r.region["geojson"]["type"] == "FeatureCollection"
    probs = [x.probability for x in r.candidates]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6


def test_options_are_validated():
    for bad in (
        dict(top_k=0),
        dict(top_k=1000),
        dict(region_share=0),
        dict(countries=("FRA",)),
        dict(normalization="x"),
        dict(nms_km=float("nan")),
    ):
        with pytest.raises(InvalidOptionError):
            LocateOptions(**bad).validate(max_top_k=100, max_retrieve_k=1000)


def test_a_batch_gives_each_query_the_answer_it_gets_alone(locator):
    # The stages score the whole batch in shared GPS-tower calls; no query may see another's.
    q = queries(locator)
    together = locator.locate_embeddings(q, LocateOptions())
    for i in range(len(q)):
        alone = locator.locate_embeddings(q[i : i + 1], LocateOptions())[0]
        got = [(c.lat, c.lon, c.probability) for c in together[i].candidates]
        want = [(c.lat, c.lon, c.probability) for c in alone.candidates]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def with_references(locator, root, vectors, points) -> Locator:
    """``locator`` with a reference-image index of these vectors and points."""
    publish_index(
        root, "refs", vectors, points, profile="geoclip", gallery_kind="images", h3_resolution=None
    )
    return Locator(
        locator.model, locator.index, locator.geocoder, neighbours=load_index(root, "refs")
    )


def test_verification_ranks_the_neighbours_by_structure_too(locator, tmp_path):
    """A reference whose picture has the query's layout outranks a closer embedding of
    another picture, by structure_weight x their correlation; at weight 0 it does not."""
    from PIL import Image

    from encoders.structure import structure_descriptors

    rng = np.random.default_rng(0)
    query_pic, other_pic = (
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)
    )
    q = queries(locator)[:1]  # as if taken in Île-de-France
    side = rng.standard_normal(q.shape[1]).astype(np.float32)
    side -= (side @ q[0]) * q[0]
    side /= np.linalg.norm(side)
    match = 0.9 * q[0] + np.sqrt(1 - 0.81) * side  # cosine 0.9, the query's picture
    vectors = np.stack([q[0], match]).astype(np.float32)  # the decoy: cosine 1, another picture
    latlon = np.array([TRUTHS[1], TRUTHS[0]])  # decoy near Tokyo, match in Île-de-France
    points = PointTable(
        ids=np.array([1, 2]),
        latlon=latlon,
        country=locator.geocoder.country_codes(latlon),
        structure=structure_descriptors([other_pic, query_pic]),
    )
    loc = with_references(locator, tmp_path, vectors, points)
    assert loc.compares_structure
    pic = loc.structure([query_pic])

    def neighbours(**kw):
        opts = LocateOptions(return_neighbours=True, **kw)
        return loc.locate_embeddings(q, opts, structure=pic)[0].extra["neighbours"]

    ranked = neighbours(structure_weight=0.5)
    assert [n["id"] for n in ranked] == [2, 1]
    assert ranked[0]["structure"] > 0.99 and abs(ranked[1]["structure"]) < 0.3
    assert ranked[0]["similarity"] == pytest.approx(0.9, abs=1e-4)  # the cosine, as before
    assert [n["id"] for n in neighbours(structure_weight=0.0)] == [1, 2]
    plain = loc.locate_embeddings(q, LocateOptions(return_neighbours=True))[0]
    assert [n["id"] for n in plain.extra["neighbours"]] == [1, 2]
    assert "structure" not in plain.extra["neighbours"][0]
    with pytest.raises(InvalidOptionError):
        LocateOptions(structure_weight=-1).validate(
            max_top_k=10, max_retrieve_k=100, max_nprobe=1, max_rerank_k=0
        )


def test_verification_ranks_the_neighbours_by_colour_too(locator, tmp_path):
    """A reference whose thumbnail has the query picture's colours outranks closer
    embeddings of other pictures, by colour_weight x their agreement, even from beyond the
    ``neighbours`` nearest by cosine; one stored without a thumbnail gets no credit; at weight
    0, or from an index without thumbnails, colours change nothing."""
    from PIL import Image

    from encoders.structure import colour_thumbnails

    rng = np.random.default_rng(1)
    query_pic, other_pic = (
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((32, 32))
        for _ in range(2)
    )
    q = queries(locator)[:1]  # as if taken in Île-de-France
    side = rng.standard_normal(q.shape[1]).astype(np.float32)
    side -= (side @ q[0]) * q[0]
    side /= np.linalg.norm(side)

    def at(cos: float) -> np.ndarray:
        return cos * q[0] + np.sqrt(1 - cos**2) * side

    # The decoy: cosine 1, another picture; the match: cosine 0.9, the query's picture; a
    # reference without a thumbnail: cosine 0.95.
    vectors = np.stack([q[0], at(0.9), at(0.95)]).astype(np.float32)
    latlon = np.array([TRUTHS[1], TRUTHS[0], TRUTHS[2]])  # Tokyo, Île-de-France, elsewhere
    thumbs = colour_thumbnails([other_pic, query_pic, query_pic])
    thumbs[2] = 0  # unknown
    points = PointTable(
        ids=np.array([1, 2, 3]),
        latlon=latlon,
        country=locator.geocoder.country_codes(latlon),
        colour=thumbs,
    )
    loc = with_references(locator, tmp_path, vectors, points)
    assert loc.compares_colour and not loc.compares_structure
    _, colour, _ = loc.read([query_pic])
    assert colour is not None

    def answer(**kw):
        opts = LocateOptions(return_neighbours=True, **kw)
        return loc.locate_embeddings(q, opts, colour=colour)[0]

    found = answer(colour_weight=0.5)
    ranked = found.extra["neighbours"]
    assert [n["id"] for n in ranked] == [2, 1, 3]
    assert [n["colour"] for n in ranked] == [1.0, 0.0, None]
    assert ranked[0]["similarity"] == pytest.approx(0.9, abs=1e-4)  # the cosine, as before
    # The neighbours' weights move the answer to the match's place.
    first = found.candidates[0]
    assert dist(np.array([[first.lat, first.lon]]), TRUTHS[:1])[0] < 300
    # From beyond the one neighbour kept: the colours rank a deeper shortlist.
    assert [n["id"] for n in answer(colour_weight=0.5, neighbours=1).extra["neighbours"]] == [2]
    assert [n["id"] for n in answer(colour_weight=0.0).extra["neighbours"]] == [1, 3, 2]
    plain = with_references(locator, tmp_path / "plain", vectors, replace(points, colour=None))
    assert not plain.compares_colour and plain.read([query_pic])[1] is None
    bare = plain.locate_embeddings(q, LocateOptions(return_neighbours=True), colour=colour)[0]
    assert [n["id"] for n in bare.extra["neighbours"]] == [1, 3, 2]
    assert "colour" not in bare.extra["neighbours"][0]
    with pytest.raises(InvalidOptionError):
        LocateOptions(colour_threshold=1.0).validate(
            max_top_k=10, max_retrieve_k=100, max_nprobe=1, max_rerank_k=0
        )


def beyond_the_shortlist(locator, rng, n_decoys: int):
    """A query (as if taken in Île-de-France) and reference vectors and places for it:
    ``n_decoys`` at cosine 0.85 near Tokyo, then its own picture's at cosine 0.6, farther
    than the embedding's whole shortlist."""
    q = queries(locator)[:1]

    def at_cosine(c: float) -> np.ndarray:
        side = rng.standard_normal(q.shape[1]).astype(np.float32)
        side -= (side @ q[0]) * q[0]
        return c * q[0] + np.sqrt(1 - c * c) * side / np.linalg.norm(side)

    vectors = np.stack([at_cosine(0.85) for _ in range(n_decoys)] + [at_cosine(0.6)])
    latlon = np.array([TRUTHS[1]] * n_decoys + [TRUTHS[0]])
    return q, vectors.astype(np.float32), latlon


def test_verification_finds_a_reference_by_structure_alone(locator, tmp_path, monkeypatch):
    """A reference whose embedding is farther than the whole embedding shortlist (as under a
    colour change the image tower has not learnt) but whose picture has the query's layout
    is found by the structure search and outranks the decoys; without that search it is
    never seen."""
    from PIL import Image

    from encoders.structure import structure_descriptors
    from service.engine import locator as pipeline

    rng = np.random.default_rng(1)
    n_decoys = pipeline.STRUCTURE_POOL + 10
    pics = [
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
        for _ in range(n_decoys + 1)
    ]
    q, vectors, latlon = beyond_the_shortlist(locator, rng, n_decoys)
    points = PointTable(
        ids=np.arange(1, n_decoys + 2),
        latlon=latlon,
        country=locator.geocoder.country_codes(latlon),
        structure=structure_descriptors(pics),
    )
    loc = with_references(locator, tmp_path, vectors, points)
    assert loc.neighbours._structure_codes is not None  # built at load, not by a request
    # The query's own picture, in a false-colour rendering: its luminance order is kept.
    hazy = pics[-1].convert("L").point(lambda v: 40 + v // 2)
    opts = LocateOptions(return_neighbours=True)

    def located():
        return loc.locate_embeddings(q, opts, structure=loc.structure([hazy]))[0]

    found = located()
    assert found.extra["neighbours"][0]["id"] == n_decoys + 1
    assert found.extra["neighbours"][0]["similarity"] == pytest.approx(0.6, abs=1e-4)
    assert found.extra["neighbours"][0]["structure"] > 0.95
    monkeypatch.setattr(pipeline, "STRUCTURE_SEARCH", 0)
    unseen = located()
    assert n_decoys + 1 not in [n["id"] for n in unseen.extra["neighbours"]]


def test_verification_finds_a_reference_by_colour_alone(locator, tmp_path, monkeypatch):
    """A reference whose embedding is farther than the whole embedding shortlist (as for a
    picture whose codec smeared its texture) but whose colours are the query's is found by the
    colour search, built at load, and outranks the decoys; without that search it is never
    seen."""
    from PIL import Image

    from encoders.structure import colour_thumbnails
    from service.engine import locator as pipeline

    rng = np.random.default_rng(5)
    n_decoys = pipeline.STRUCTURE_POOL + 10
    pics = [
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((32, 32))
        for _ in range(n_decoys + 1)
    ]
    q, vectors, latlon = beyond_the_shortlist(locator, rng, n_decoys)
    points = PointTable(
        ids=np.arange(1, n_decoys + 2),
        latlon=latlon,
        country=locator.geocoder.country_codes(latlon),
        colour=colour_thumbnails(pics),
    )
    loc = with_references(locator, tmp_path, vectors, points)
    assert loc.neighbours._colour_codes is not None  # built at load, not by a request
    smeared = pics[-1].resize((8, 8)).resize((32, 32), Image.Resampling.BILINEAR)
    opts = LocateOptions(return_neighbours=True)

    def located():
        return loc.locate_embeddings(q, opts, colour=loc.read([smeared])[1])[0]

    found = located()
    assert found.extra["neighbours"][0]["id"] == n_decoys + 1
    assert found.extra["neighbours"][0]["similarity"] == pytest.approx(0.6, abs=1e-4)
    assert found.extra["neighbours"][0]["colour"] > 0.5
    monkeypatch.setattr(pipeline, "COLOUR_SEARCH", 0)
    unseen = located()
    assert n_decoys + 1 not in [n["id"] for n in unseen.extra["neighbours"]]


def test_a_false_colour_picture_finds_its_reference_along_its_ramp(locator, tmp_path):
    """A picture drawn through a colour ramp whose luminance rises and falls is described by
    its position along the ramp, turned the way its best reference match runs: the structure
    search finds the true-colour reference of its place, which its luminance layout would
    not."""
    from PIL import Image

    from encoders.structure import structure_descriptors, structure_similarity

    rng = np.random.default_rng(8)
    # Smooth grey layouts (8 x 8 cells), as views of the ground have.
    refs = [
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))
        .resize((64, 64))
        .convert("RGB")
        for _ in range(60)
    ]
    t = np.asarray(refs[3].convert("L"), np.float32) / 255.0
    swing = np.sin(3.0 * np.pi * t)  # the ramp's own luminance rises, falls and rises
    ramp = np.stack([t, 0.5 + 0.4 * swing, 0.5 - 0.2 * swing], axis=-1)
    pic = Image.fromarray(np.round(ramp * 255).astype(np.uint8))
    q = queries(locator)[:1]
    vectors = rng.standard_normal((len(refs), q.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # embeddings that say nothing
    latlon = np.array([TRUTHS[0] if i == 3 else TRUTHS[1] for i in range(len(refs))])
    stored = structure_descriptors(refs)
    points = PointTable(
        ids=np.arange(len(refs)),
        latlon=latlon,
        country=locator.geocoder.country_codes(latlon),
        structure=stored,
    )
    loc = with_references(locator, tmp_path, vectors, points)
    along = loc.structure([pic])
    assert structure_similarity(along[0], stored[3:4])[0] > 0.9
    assert structure_similarity(structure_descriptors([pic])[0], stored[3:4])[0] < 0.5
    opts = LocateOptions(return_neighbours=True)
    found = loc.locate_embeddings(q, opts, structure=along)[0]
    assert found.extra["neighbours"][0]["id"] == 3
    # A ramp read the wrong way round is turned round; a picture in true colour never is.
    backwards = -along
    np.testing.assert_array_equal(loc.orient(backwards, np.array([True])), along)
    np.testing.assert_array_equal(loc.orient(backwards, np.array([False])), backwards)


def test_the_verdict_sees_the_best_layout_match_among_the_references(locator, tmp_path):
    """The verdict's ``ref_best_structure``: the best structure correlation among the
    references the structure search finds. High for a picture whose layout a reference
    has, low for one whose layout none has, 0 without descriptors; retrieval's own search
    gives the same figure as the verdict's search without it."""
    from PIL import Image

    from encoders.structure import structure_descriptors
    from service.engine.localizability import FEATURES, image_statistics_many

    rng = np.random.default_rng(5)
    # Smooth layouts (8 x 8 cells), as views of the ground have; the last is no reference's.
    pics = [
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((64, 64))
        for _ in range(41)
    ]
    refs, stranger = pics[:40], pics[40]
    q = queries(locator)[:2]
    latlon = np.array([TRUTHS[i % len(TRUTHS)] for i in range(len(refs))])
    points = PointTable(
        ids=np.arange(1, len(refs) + 1),
        latlon=latlon,
        country=locator.geocoder.country_codes(latlon),
        structure=structure_descriptors(refs),
    )
    vectors = np.repeat(q[:1], len(refs), axis=0) + 0.01 * rng.standard_normal(
        (len(refs), q.shape[1])
    ).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    loc = with_references(locator, tmp_path, vectors.astype(np.float32), points)
    # The first picture is a reference's own, darker (its luminance order is kept).
    seen = refs[7].point(lambda v: v // 2)
    shown = [seen, stranger]
    opts = LocateOptions()
    column = FEATURES.index("ref_best_structure")
    stats = image_statistics_many(shown)
    searched = loc.judge_features(q, stats, opts, loc.structure(shown))[:, column]
    assert searched[0] > 0.95 and searched[1] < 0.8, searched
    assert np.all(loc.judge_features(q, stats, opts)[:, column] == 0)  # no descriptors
    # Retrieval's own search, which the verdict reuses, gives the same figure.
    pictures = loc.structure(shown)
    scored = loc._score(q, opts, 1.0, pictures)
    from_retrieval = loc._best_structure(pictures, np.stack([s.refs_found for s in scored]))
    assert list(from_retrieval) == pytest.approx(list(searched))


def test_a_narrow_reference_view_places_the_answer_at_its_match(locator, tmp_path):
    """A reference view of known width gets a kernel of neighbour_kernel_share of that
    width: a narrow look-alike 40 km from where the GPS tower would answer pins the answer
    to its own location; of unknown width, the common kernel leaves the GPS tower's answer."""
    q = queries(locator)[:1]
    here = np.array([[TRUTHS[0][0] + 0.36, TRUTHS[0][1]]])  # 40 km north
    widths = {"narrow": np.array([200.0], np.float32), "unknown": np.array([np.nan], np.float32)}
    opts = LocateOptions(return_neighbours=True, neighbour_weight=5.0, neighbour_kernel_share=0.05)
    got, locs = {}, {}
    for name, width in widths.items():
        points = PointTable(np.array([1]), here, locator.geocoder.country_codes(here), width=width)
        locs[name] = with_references(locator, tmp_path / name, q.copy(), points)
        got[name] = locs[name].locate_embeddings(q, opts)[0]
    narrow, unknown = (dist(top1([got[k]]), here)[0] for k in ("narrow", "unknown"))
    assert narrow < 1.0 < 10.0 < unknown
    assert got["narrow"].extra["neighbours"][0]["width_km"] == 200.0
    assert got["unknown"].extra["neighbours"][0]["width_km"] is None
    # At share 0 a stored width changes nothing.
    off = locs["narrow"].locate_embeddings(q, replace(opts, neighbour_kernel_share=0.0))[0]
    assert top1([off]) == pytest.approx(top1([got["unknown"]]))


def test_a_near_copy_of_a_narrow_reference_answers_first(locator, tmp_path):
    """A first reference neighbour whose colours closely match the picture's and whose view is
    at most near_copy_km wide puts its own place first (source and stage ``near_copy``), with
    at least NEAR_COPY_ODDS / (1 + NEAR_COPY_ODDS) of the mass at any temperature, far from where
    the GPS tower answers; a wide view, another picture's colours, an unknown width, a copy
    stored without a thumbnail, no thumbnail of the picture, colour weight 0, near_copy_km 0,
    no verification or gallery normalisation leave the answer alone."""
    from PIL import Image

    from encoders.structure import colour_thumbnails
    from service.engine.locator import NEAR_COPY, NEAR_COPY_ODDS

    rng = np.random.default_rng(2)
    query_pic, other_pic = (
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((32, 32))
        for _ in range(2)
    )
    q = queries(locator)[:1]  # the GPS tower's Île-de-France
    side = rng.standard_normal(q.shape[1]).astype(np.float32)
    side -= (side @ q[0]) * q[0]
    side /= np.linalg.norm(side)
    # The decoy: cosine 1, another picture's colours, in Tokyo; the copy: cosine 0.6, the
    # query's colours, in Kenya (ranked first by 0.6 + colour_weight x 1 against 1 + 0).
    vectors = np.stack([q[0], 0.6 * q[0] + 0.8 * side]).astype(np.float32)
    latlon = np.array([TRUTHS[1], TRUTHS[4]])
    thumbs = colour_thumbnails([other_pic, query_pic])

    def served(width_km: float, thumbs=thumbs, name="", with_colour=True, **kw):
        points = PointTable(
            ids=np.array([1, 2]),
            latlon=latlon,
            country=locator.geocoder.country_codes(latlon),
            width=np.array([200.0, width_km], np.float32),
            colour=thumbs,
        )
        loc = with_references(locator, tmp_path / f"{name}{width_km:g}", vectors, points)
        colour = loc.read([query_pic])[1] if with_colour else None
        return loc.locate_embeddings(q, LocateOptions(return_neighbours=True, **kw), colour=colour)

    copied = served(300.0)[0]
    assert copied.extra["neighbours"][0]["id"] == 2 and copied.extra["neighbours"][0]["colour"] == 1
    first = copied.candidates[0]
    assert first.source == NEAR_COPY and NEAR_COPY in copied.stages
    assert dist(top1([copied]), TRUTHS[4:5])[0] < 1.0
    assert first.probability >= NEAR_COPY_ODDS / (1 + NEAR_COPY_ODDS) - 1e-6
    assert first.probability == max(c.probability for c in copied.candidates)
    # ... at any temperature: a calibration's softens every other candidate, not the copy.
    for t in (0.5, 3.0):
        warm = served(300.0, temperature=t, name=f"t{t}")[0].candidates[0]
        assert warm.source == NEAR_COPY
        assert warm.probability >= NEAR_COPY_ODDS / (1 + NEAR_COPY_ODDS) - 1e-6

    def not_copied(result) -> None:
        assert NEAR_COPY not in result.stages
        assert all(c.source != NEAR_COPY for c in result.candidates)
        assert dist(top1([result]), TRUTHS[:1])[0] < 300  # the GPS tower's answer

    not_copied(served(600.0)[0])  # too wide a view to place the picture
    not_copied(served(float("nan"))[0])  # unknown width
    not_copied(served(300.0, near_copy_km=0.0)[0])
    not_copied(served(300.0, near_copy_km=200.0)[0])
    others = colour_thumbnails([other_pic, other_pic])  # no reference has the query's colours
    not_copied(served(300.0, thumbs=others, name="others")[0])
    unknown = thumbs.copy()
    unknown[1] = 0  # the copy stored without a thumbnail
    not_copied(served(300.0, thumbs=unknown, name="unknown")[0])
    not_copied(served(300.0, with_colour=False, name="no-colour")[0])
    not_copied(served(300.0, colour_weight=0.0, name="w0")[0])
    gallery = served(300.0, normalization="gallery", name="g")[0]
    assert NEAR_COPY not in gallery.stages
    assert all(c.source != NEAR_COPY for c in gallery.candidates)
    unverified = served(300.0, verify=False, name="v")[0]
    assert NEAR_COPY not in unverified.stages
    assert all(c.source != NEAR_COPY for c in unverified.candidates)
    bad_options = (
        {"near_copy_colour": 1.5},
        {"near_copy_colour": 0.0},  # any thumbnail would be a copy of a flat picture
        {"near_copy_km": -1.0},
        {"near_copy_km": float("nan")},
    )
    for bad in bad_options:
        with pytest.raises(InvalidOptionError):
            LocateOptions(**bad).validate(
                max_top_k=10, max_retrieve_k=100, max_nprobe=1, max_rerank_k=0
            )
