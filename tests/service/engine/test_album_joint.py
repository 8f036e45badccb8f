"""Albums in the engine: how pictures are combined (service/engine/album.py) and
``Locator.locate_album`` on real tiles with a fitted verdict; the CLI's --album."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from api_helpers import tile_bytes
from PIL import Image
from typer.testing import CliRunner

from index.geo import haversine_km
from service.cli.main import app
from service.config import Settings
from service.engine.album import combine, combine_regions, regional
from service.engine.locator import _joint_centre, _spread
from service.engine.negatives import negatives
from service.engine.options import AlbumConfig

pytest_plugins = ["api_fixtures"]  # the model, its index versions, a fitted verdict

runner = CliRunner()
SAHEL = [(13.0, 14.0), (13.3, 14.3), (12.8, 13.7), (13.1, 13.9)]
GREENLAND = (72.0, -40.0)


def tile(lat: float, lon: float) -> Image.Image:
    return Image.open(io.BytesIO(tile_bytes(lat, lon))).convert("RGB")


def test_consistent_pictures_beat_each_single_answer():
    # Point 0 is the place. Each picture is unsure and puts its own top-1 on another point,
    # but all three give point 0 a fair share: only together do they find it.
    logits = np.array(
        [
            [2.0, 3.0, 0.0, 0.0],
            [2.0, 0.0, 3.0, 0.0],
            [2.0, 0.0, 0.0, 3.0],
        ]
    )
    assert all(np.argmax(row) != 0 for row in logits)
    c = combine(logits, np.ones(3), AlbumConfig())
    assert np.argmax(c.logits) == 0
    assert c.weights.sum() == pytest.approx(1.0)
    assert not c.outlier.any()


def test_an_outlier_gets_a_low_weight_and_cannot_move_the_answer():
    m = 50
    same = np.zeros((4, m))
    same[:, 7] = 6.0  # four confident pictures of point 7
    other = np.zeros((1, m))
    other[0, 30] = 9.0  # one even more confident picture of point 30
    c = combine(np.vstack([same, other]), np.ones(5), AlbumConfig())
    assert np.argmax(c.logits) == 7
    assert c.outlier.tolist() == [False] * 4 + [True]
    assert c.weights[4] < 0.02 and c.agreement[4] < 0.05
    # Without the uniform component and the reweighting, the one picture would cost more:
    # its joint log-odds of point 30 against 7 are bounded by the mixture.
    gap = c.logits[7] - c.logits[30]
    assert gap > 5


def test_agreement_found_by_another_combination_is_used_as_it_is():
    # Picture 2 is sharp on point 2, 40 km from point 0 where the other two are: with the
    # album's spread it disagrees; the regions' combination found that it agrees.
    logits = np.array([[4.0, 0.0, 1.0, 0.0], [4.0, 0.0, 1.0, 0.0], [1.0, 0.0, 5.0, 0.0]])
    alone = combine(logits, np.ones(3), AlbumConfig())
    assert alone.outlier.tolist() == [False, False, True]
    given = combine(logits, np.ones(3), AlbumConfig(), agreement=np.ones(3))
    assert given.agreement.tolist() == [1.0, 1.0, 1.0] and not given.outlier.any()
    assert given.weights == pytest.approx([1 / 3] * 3)
    # With its full weight picture 2 pulls more mass to its spot than when it is an outlier.
    q = np.exp(given.logits - given.logits.max())
    q_alone = np.exp(alone.logits - alone.logits.max())
    assert q[2] / q.sum() > q_alone[2] / q_alone.sum()
    # An agreement of 0 for everyone falls back to the localizability weights.
    none = combine(logits, np.array([1.0, 0.5, 0.5]), AlbumConfig(), agreement=np.zeros(3))
    assert none.weights == pytest.approx([0.5, 0.25, 0.25])


def test_the_regions_decide_who_agrees_and_the_albums_spread_places_the_answer():
    # Points 0 and 2 lie 40 km apart; 1 and 3 far away. Pictures 0 and 1 are of point 0,
    # picture 2 is sharp on point 2 under the album's spread; under the regions' wider kernels
    # it supports point 0 too.
    latlon = np.array([[13.0, 14.0], [40.0, 14.0], [13.36, 14.0], [-20.0, 30.0]])
    fine = np.array([[4.0, 0.0, 1.0, 0.0], [4.0, 0.0, 1.0, 0.0], [1.0, 0.0, 5.0, 0.0]])
    coarse = np.array([[4.0, 0.0, 3.5, 0.0], [4.0, 0.0, 3.5, 0.0], [4.0, 0.0, 4.5, 0.0]])
    logits = np.stack([fine, coarse])
    config = AlbumConfig()
    assert config.regions
    alone = combine(fine, np.ones(3), config)
    assert alone.outlier[2]  # under the album's spread alone, picture 2 disagrees
    joint = combine_regions(latlon, logits, np.ones(3), config)
    wide = combine(coarse, np.ones(3), config)
    assert joint.agreement == pytest.approx(wide.agreement) and not joint.outlier.any()
    assert joint.weights == pytest.approx(wide.weights)
    assert np.argmax(joint.logits) == 0  # placed where the album's spread puts the mass
    q = np.exp(joint.logits - joint.logits.max())
    assert (q[0] + q[2]) / q.sum() == pytest.approx(
        np.exp(wide.logits[[0, 2]]).sum() / np.exp(wide.logits).sum()
    )  # the region around points 0 and 2 weighs as the wide combination says
    # No regions (one spot): the album spread's combination alone.
    spot = replace(config, spread_km=0.0)
    assert not spot.regions
    only = combine_regions(latlon, logits, np.ones(3), spot)
    assert only.logits == pytest.approx(alone.logits) and only.outlier[2]


def test_a_picture_with_no_cues_moves_nothing_and_abstained_ones_weigh_nothing():
    m = 20
    peaked = np.zeros((2, m))
    peaked[:, 3] = 5.0
    flat = np.zeros((1, m))
    with_flat = combine(np.vstack([peaked, flat]), np.ones(3), AlbumConfig())
    alone = combine(peaked, np.ones(2), AlbumConfig())
    assert np.argmax(with_flat.logits) == np.argmax(alone.logits) == 3
    assert with_flat.agreement[2] > 0.9  # consistent with anything, and it changes nothing
    # A picture whose answer abstains (localizability prior 0) has no weight at all.
    liar = np.zeros((1, m))
    liar[0, 15] = 20.0
    c = combine(np.vstack([peaked, liar]), np.array([0.9, 0.8, 0.0]), AlbumConfig())
    assert c.weights[2] == 0.0 and np.argmax(c.logits) == 3
    # Every picture abstaining: they are combined evenly (the verdict says not_locatable).
    even = combine(peaked, np.zeros(2), AlbumConfig())
    assert even.weights == pytest.approx([0.5, 0.5])


def test_locate_album_on_tiles_with_a_far_tile_and_a_text_page(judged):
    loc = judged.locator
    opts = Settings().locate_options(top_k=3)
    page = next(im for kind, im in negatives(("text",), 1, 99))
    images = [tile(*p) for p in SAHEL] + [tile(*GREENLAND), page]
    album = loc.locate_album(images, opts)
    assert len(album.images) == 6 and album.weights.sum() == pytest.approx(1.0)
    verdicts = [r.localizability["verdict"] for r in album.images]
    assert verdicts[5] == "not_locatable" and album.weights[5] == 0.0
    assert album.outlier[4] and album.weights[4] < 0.05, album.parts()
    assert not album.outlier[:4].any()
    joint = album.joint
    assert "combine" in joint.stages and joint.candidates and joint.region is not None
    assert joint.localizability["verdict"] == "located"
    assert joint.localizability["reason"].startswith("4 of 6 pictures agree")
    top = joint.candidates[0]
    err = float(haversine_km(top.lat, top.lon, *SAHEL[0]))
    assert err < 300, (top, err)
    # Each picture keeps its own answer (the far tile's is its own place).
    far = album.images[4].candidates[0]
    assert haversine_km(far.lat, far.lon, *GREENLAND) < 2000
    assert set(joint.timings_ms) >= {"encode", "retrieve", "verify", "combine", "describe"}


def test_an_album_of_pictures_that_are_no_satellite_views_abstains(judged):
    loc = judged.locator
    opts = Settings().locate_options()
    pictures = [im for _, im in negatives(("text", "flat", "white_noise"), 3, 7)]
    alone = loc.locate(pictures, opts)
    # The album is as locatable as its most locatable picture: take those judged
    # not_locatable on their own (most of them, with this small test fit).
    pages = [p for p, r in zip(pictures, alone, strict=True) if r.localizability["abstained"]]
    assert len(pages) >= 5
    album = loc.locate_album(pages, opts)
    verdict = album.joint.localizability
    assert verdict["verdict"] == "not_locatable" and verdict["abstained"]
    assert album.joint.region is None and album.joint.countries == []
    assert all(not c.reliable for c in album.joint.candidates)


def test_cli_locate_album(judged, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(judged.data_dir))
    monkeypatch.setenv("GEOLOC_INDEX_VERSION", judged.versions[0])
    paths = []
    for i, p in enumerate([*SAHEL[:3], GREENLAND]):
        paths.append(tmp_path / f"v{i}.png")
        paths[-1].write_bytes(tile_bytes(*p))
    result = runner.invoke(app, ["locate", "--album", *map(str, paths), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("album of 4 images (joint answer)")
    per_image = [line for line in lines if "weight" in line and "agreement" in line]
    assert len(per_image) == 4 and per_image[3].endswith("(outlier)")
    assert not any(line.endswith("(outlier)") for line in per_image[:3])

    out = json.loads(
        runner.invoke(app, ["locate", "--album", *map(str, paths[:2]), "--json"]).stdout
    )
    (item,) = out["results"]
    assert item["input"] == [str(p) for p in paths[:2]]
    body = item["result"]
    assert body["used"] == 2 and len(body["images"]) == 2 and body["candidates"]
    assert sum(i["weight"] for i in body["images"]) == pytest.approx(1.0)

    one = runner.invoke(app, ["locate", "--album", str(paths[0])])
    assert one.exit_code == 2 and "--album takes 2 to" in one.output

    # --spread-km: the album's own spread (0: one spot, so no mean place is scored).
    sahel = []
    for i, p in enumerate(SAHEL):
        sahel.append(tmp_path / f"s{i}.png")
        sahel[-1].write_bytes(tile_bytes(*p))
    four = [*map(str, sahel), "--json", "--top-k", "5"]  # test_locate_album_adds_the_joint_centre's
    sources = {}
    for spread in ("0", "25"):
        got = runner.invoke(app, ["locate", "--album", *four, "--spread-km", spread])
        assert got.exit_code == 0, got.output
        body = json.loads(got.stdout)["results"][0]["result"]
        sources[spread] = [c["source"] for c in body["candidates"]]
    assert "album" not in sources["0"] and sources["25"][0] == "album", sources
    lone = runner.invoke(app, ["locate", str(paths[0]), "--spread-km", "10"])
    assert lone.exit_code == 2 and "add --album" in lone.output
    for bad in ("-1", "5000", "nan"):
        wide = runner.invoke(app, ["locate", "--album", *four, "--spread-km", bad])
        assert wide.exit_code == 2 and "--spread-km must be 0 to 2,000 km" in wide.output


def test_an_albums_spread_widens_each_pictures_kernels():
    latlon = np.array([[10.0, 20.0], [11.0, 21.0]])
    support = (latlon, np.array([0.5, 0.5]), np.array([15.0, 50.0]))
    assert _spread(support, 0.0) is support
    widened = _spread(support, 20.0)
    assert widened[2] == pytest.approx([25.0, np.hypot(50.0, 20.0)])
    assert widened[0] is latlon and _spread(None, 20.0) is None


def test_regions_weigh_as_the_wide_combination_says_and_share_as_the_album_spread_does():
    # Two regions 1,000 km apart: points 0-1 in one, 2-3 in the other.
    distance = np.array(
        [[0, 40, 1000, 1000], [40, 0, 1000, 1000], [1000, 1000, 0, 30], [1000, 1000, 30, 0]],
        dtype=float,
    )
    # The album's spread puts most mass on the first region, 5:2 between its points; the
    # wider spread gives the second region 0.8.
    fine = np.log([0.5, 0.2, 0.2, 0.1])
    coarse = np.log([0.1, 0.1, 0.5, 0.3])
    q = np.exp(regional(distance, fine, coarse, 100.0))
    q /= q.sum()
    assert q[2] + q[3] == pytest.approx(0.8)
    assert q[0] / q[1] == pytest.approx(2.5) and q[2] / q[3] == pytest.approx(2.0)
    assert np.argmax(q) == 2  # the first place moves to the region the wide spread prefers
    # Where both agree on the regions, nothing moves; a point ruled out stays out.
    same = regional(distance, fine, fine + 3.0, 100.0)
    assert np.exp(same) / np.exp(same).sum() == pytest.approx(np.exp(fine) / np.exp(fine).sum())
    ruled_out = regional(distance, np.array([0.0, -np.inf, 0.0, 0.0]), coarse, 100.0)
    assert ruled_out[1] == -np.inf and np.isfinite(ruled_out[[0, 2, 3]]).all()
    assert regional(np.zeros((0, 0)), np.empty(0), np.empty(0), 100.0).shape == (0,)
    # A whole region ruled out stays out; one far below the best does not underflow.
    gone = regional(distance, np.array([0.0, 0.0, -np.inf, -np.inf]), coarse, 100.0)
    assert np.isfinite(gone[:2]).all() and (gone[2:] == -np.inf).all()
    low = regional(distance, np.array([0.0, -1.0, -900.0, -901.0]), coarse, 100.0)
    assert np.isfinite(low).all()
    assert low[2] - low[3] == pytest.approx(1.0) and np.argmax(low) == 2


def test_the_joint_centre_averages_the_pooled_points_near_the_first():
    # Three pictures' places around (13, 14), each ~40 km from it, and one far point.
    pooled = np.array([[13.36, 14.0], [12.82, 14.31], [12.82, 13.69], [40.0, 14.0]])
    joint = np.array([0.0, -0.1, -0.2, 5.0])
    # The far point is the joint's first: nothing else lies near it.
    assert _joint_centre(pooled, joint, 100.0) is None
    joint[3] = -9.0
    centre = _joint_centre(pooled, joint, 100.0)
    assert centre.shape == (1, 2)
    assert haversine_km(*centre[0], 13.0, 14.0) < 5.0  # among them, nearer than any of them
    assert min(haversine_km(*centre[0], *p) for p in pooled[:3]) > 30.0
    # Heavier points pull it: the first alone outweighs the other two.
    leaning = _joint_centre(pooled, np.array([0.0, -5.0, -5.0, -9.0]), 100.0)
    assert haversine_km(*leaning[0], *pooled[0]) < 5.0
    assert _joint_centre(pooled, joint, 0.0) is None  # no spread: the pool as it is


def test_locate_album_adds_the_joint_centre(judged):
    loc = judged.locator
    opts = Settings().locate_options(top_k=5)
    images = [tile(*p) for p in SAHEL]
    spread = loc.locate_album(images, opts, AlbumConfig(spread_km=25.0))
    without = loc.locate_album(images, opts, AlbumConfig(spread_km=0.0))
    # The mean of the pooled places near the first is kept only as the new first place.
    top = spread.joint.candidates[0]
    assert top.source == "album", [c.source for c in spread.joint.candidates]
    assert [c.source for c in spread.joint.candidates[1:]].count("album") == 0
    assert "album" not in [c.source for c in without.joint.candidates]
    assert haversine_km(top.lat, top.lon, *SAHEL[0]) < 300


def test_an_albums_near_copies_lead_the_joint_answer(bm_locator, tmp_path):
    """Pictures each a near copy of a narrow reference view of one place (its colours, 300 km
    wide) put the reference's place first alone and in the album's joint answer, however far
    it is from where the image tower places them; with near_copy_km 0 neither answer moves
    there."""
    from encoders.structure import colour_thumbnails
    from index.store import PointTable, load_index, publish_index
    from service.engine.locator import NEAR_COPY, Locator

    images = [tile(*p) for p in SAHEL]
    far = np.tile([[-25.0, 135.0]], (len(images), 1))  # four views of one place in Australia
    points = PointTable(
        ids=np.arange(len(images)),
        latlon=far,
        country=bm_locator.geocoder.country_codes(far),
        width=np.full(len(images), 300.0, np.float32),
        colour=colour_thumbnails(images),
    )
    publish_index(
        tmp_path,
        "refs",
        bm_locator.embed(images),
        points,
        profile=bm_locator.model.profile,
        gallery_kind="images",
        h3_resolution=None,
    )
    loc = Locator(
        bm_locator.model,
        bm_locator.index,
        bm_locator.geocoder,
        neighbours=load_index(tmp_path, "refs"),
    )
    opts = Settings().locate_options(top_k=3)
    album = loc.locate_album(images, opts)
    for single, copy in zip(album.images, far, strict=True):
        assert single.candidates[0].source == NEAR_COPY
        assert haversine_km(single.candidates[0].lat, single.candidates[0].lon, *copy) < 1
    top = album.joint.candidates[0]
    assert haversine_km(top.lat, top.lon, *far[0]) < 1, album.joint.candidates
    assert top.source == NEAR_COPY and NEAR_COPY in album.joint.stages
    off = loc.locate_album(images, replace(opts, near_copy_km=0.0))
    for answer in (off.joint, *off.images):
        first = answer.candidates[0]
        assert haversine_km(first.lat, first.lon, *SAHEL[0]) < 500
        assert first.source != NEAR_COPY and NEAR_COPY not in answer.stages
