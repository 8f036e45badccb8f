"""The localizability verdict: fitted by `geoloc calibrate` on held-out Blue Marble tiles against
generated negatives, stored in the calibration beside the index version, carried by every
answer (pipeline, micro-batching, the HTTP routes, the CLI, eval), abstaining below its
threshold, and reloaded with the calibration on an index swap.

The negatives of these tests come from other seeds than the fit's; no natural photo is used."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import FIT_TILES, NEGATIVES_PER_KIND
from api_helpers import tile_bytes
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from index.store import new_version
from service.api import operations
from service.cli.main import app
from service.config import Settings
from service.db import (
    activate_index,
    make_engine,
    make_sessionmaker,
    sync_index_versions,
    upgrade,
)
from service.engine import localizability as L
from service.engine.calibration import (
    CalibrationError,
    list_calibrations,
    load_calibration,
    save_calibration,
    weights_label,
)
from service.engine.loading import load_locator
from service.engine.negatives import KINDS, kinds_for, negatives
from service.jobs.calibrate import NEGATIVES_SEED
from service.jobs.datasets import read_labelled_csv
from service.jobs.training import write_bluemarble_set

pytest_plugins = ["api_fixtures"]  # the model, its two index versions, a fitted verdict

TEST_SEED = 4_040_404  # the tests' negatives: another stream than the fit's
runner = CliRunner()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def test_negatives() -> list[tuple[str, Image.Image]]:
    return list(negatives(KINDS, 4, TEST_SEED))


def test_the_fit_is_recorded_in_the_calibration_artifact(judged):
    raw = json.loads(Path(judged.path).read_text())
    assert raw["format"] == 2
    loc = raw["localizability"]
    assert loc["domain"] == "satellite" and loc["features"] == list(L.FEATURES)
    assert 0 <= loc["t_low"] <= loc["t_high"] <= 1
    fit = loc["fit"]
    assert fit["in_domain_images"] == FIT_TILES
    assert fit["negative_kinds"] == dict.fromkeys(sorted(KINDS), NEGATIVES_PER_KIND)
    val = fit["validation"]
    # The thresholds' own targets, on the out-of-fold scores.
    assert val["in_domain"]["not_locatable"] <= 0.05
    assert val["negatives"]["located"] <= 0.03
    assert set(val["per_kind"]) == set(KINDS)
    assert set(fit["leave_one_kind_out"]) == set(KINDS)
    assert all(0 <= v["flagged"] <= 1 for v in fit["leave_one_kind_out"].values())
    assert judged.locator.judge is not None and judged.locator.judge.t_low == loc["t_low"]


def test_the_verdict_separates_generated_negatives_from_held_out_tiles(
    judged, test_negatives, tmp_path
):
    loc = judged.locator
    opts = Settings().locate_options(top_k=3)
    held = write_bluemarble_set(tmp_path / "held", 120, seed=616, kind="test", progress=False)
    tiles = [Image.open(r.path).convert("RGB") for r in read_labelled_csv(held)[0]]
    tile_verdicts = [r.localizability for r in loc.locate(tiles, opts)]
    neg_results = loc.locate([im for _, im in test_negatives], opts)
    neg_verdicts = [r.localizability for r in neg_results]
    assert all(v is not None for v in tile_verdicts + neg_verdicts)

    tiles_lost = np.mean([v["verdict"] == "not_locatable" for v in tile_verdicts])
    tiles_located = np.mean([v["verdict"] == "located" for v in tile_verdicts])
    flagged = np.array([v["verdict"] != "located" for v in neg_verdicts])
    assert tiles_lost <= 0.08, tiles_lost  # target: at most 5 % (a small sample here)
    assert tiles_located >= 0.7, tiles_located  # the least typical tenth may be uncertain
    assert flagged.mean() >= 0.9, flagged.mean()  # target: at least 95 %
    kinds = np.array([k for k, _ in test_negatives])
    for k in KINDS:  # no kind gets through wholesale
        assert flagged[kinds == k].mean() >= 0.5, k
    scores_in = np.array([v["score"] for v in tile_verdicts])
    scores_out = np.array([v["score"] for v in neg_verdicts])
    assert np.median(scores_in) > np.percentile(scores_out, 90)

    for v in neg_verdicts:
        assert 0 <= v["score"] <= 1 and v["abstained"] == (v["score"] < loc.judge.t_low)
        if v["verdict"] == "not_locatable":
            assert v["reason"].startswith("unlike the satellite views of the Earth's surface")
    located = next(v for v in tile_verdicts if v["verdict"] == "located")
    assert located["reason"] == "like the satellite views of the Earth's surface this model knows"
    # Abstained answers keep their candidates, flagged, with no region or country mass.
    for r in neg_results:
        if r.localizability["abstained"]:
            assert r.candidates and not any(c.reliable for c in r.candidates)
            assert r.region is None and r.countries == []
            assert "judge" in r.stages and r.timings_ms["judge"] > 0


def test_the_reason_names_a_preferred_feature_unless_another_is_much_further_out(judged):
    """Straight edges are named before hard edges, but not when the edges are hard everywhere
    and only a few are straight (a photo), nor a feature only a little outside the domain."""
    model = judged.locator.judge
    hv, hard = model.features.index("hv_edge_share"), model.features.index("strong_edge_share")

    def why(z_hv: float, z_hard: float) -> str:
        x = model.typical_median.copy()
        x[hv] += z_hv * model.typical_scale[hv]
        x[hard] += z_hard * model.typical_scale[hard]
        return model.reason("not_locatable", x)

    straight, hard_edges = L._PHRASES["hv_edge_share"][0], L._PHRASES["strong_edge_share"][0]
    assert why(20.0, 27.0).endswith(straight)  # a page: both far out, straight edges named
    assert why(5.0, 30.0).endswith(hard_edges)  # a photo: a few straight edges, hard ones
    assert why(2.5, 30.0).endswith(hard_edges)
    assert why(30.0, 2.5).endswith(straight)


def test_the_verdict_does_not_depend_on_the_request_filters(judged):
    loc = judged.locator
    tile = Image.open(io.BytesIO(tile_bytes(-25.0, 133.0))).convert("RGB")
    s = Settings()
    plain = loc.locate([tile], s.locate_options())[0].localizability
    filtered = loc.locate([tile], s.locate_options(countries=("FR",), neighbours=0))[0]
    assert filtered.localizability == plain
    # Text queries and callers without the pictures get no verdict.
    q = loc.embed([tile])
    assert loc.locate_embeddings(q, s.locate_options())[0].localizability is None


def test_abstain_below_setting(judged, bm_model, test_negatives):
    s = Settings(data_dir=judged.data_dir, abstain_below=0.0)
    never = load_locator(s, model=bm_model, index_version=judged.versions[0])
    assert never.abstain_threshold == 0.0
    r = never.locate([test_negatives[0][1]], s.locate_options())[0]
    assert r.localizability["abstained"] is False and r.region is not None
    assert all(c.reliable for c in r.candidates)
    with pytest.raises(ValueError):
        Settings(abstain_below=1.5)


def test_abstention_over_http_keeps_200_and_all_fields(
    make_client, judged, test_negatives, monkeypatch
):
    text = png(next(im for k, im in test_negatives if k == "text"))
    tile = tile_bytes(29.5, 84.0)
    with make_client(data_dir=judged.data_dir, locator=judged.locator) as client:
        r = client.post("/v1/locate", files={"file": ("page.png", text, "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        v = body["localizability"]
        assert set(v) == {"score", "verdict", "reason", "abstained"}
        assert v["verdict"] == "not_locatable" and v["abstained"] is True
        assert body["candidates"] and all(c["reliable"] is False for c in body["candidates"])
        assert body["countries"] == [] and body["region"] is None
        assert body["prediction_id"] and "judge" in body["stages"]
        stored = client.get(f"/v1/predictions/{body['prediction_id']}").json()["result"]
        assert stored["localizability"] == v
        assert all(c["reliable"] is False for c in stored["candidates"])

        b64 = base64.b64encode(tile).decode()
        r = client.post("/locate", json={"image_base64": b64})
        ok = r.json()
        assert r.status_code == 200 and ok["localizability"]["abstained"] is False
        assert all(c["reliable"] for c in ok["candidates"]) and ok["region"] is not None

        files = [
            ("files", ("tile.png", tile, "image/png")),
            ("files", ("p.png", text, "image/png")),
        ]
        r = client.post("/v1/locate/batch", files=files)
        items = r.json()["items"]
        assert r.status_code == 200 and [
            i["result"]["localizability"]["abstained"] for i in items
        ] == [
            False,
            True,
        ]

        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "localizability" in schema["LocateResponse"]["properties"]
        assert "reliable" in schema["CandidateOut"]["properties"]
        assert set(schema["LocalizabilityOut"]["required"]) == {
            "score",
            "verdict",
            "reason",
            "abstained",
        }
        info = client.get("/v1/info").json()["localizability"]
        assert info["version"] == judged.calibration.version
        assert info["t_low"] == judged.locator.judge.t_low == info["abstain_below"]
        assert info["negative_kinds"] and info["in_domain"]["n"] > 0

    async def fake_fetch(url: str, **kwargs) -> bytes:
        return text

    monkeypatch.setattr(operations, "fetch_image", fake_fetch)
    with make_client(
        data_dir=judged.data_dir, locator=judged.locator, url_fetch_enabled=True
    ) as client:
        r = client.post("/v1/locate/url", json={"url": "https://example.org/page.png"})
        assert r.status_code == 200, r.text
        assert r.json()["localizability"]["abstained"] is True
        assert r.json()["region"] is None and r.json()["countries"] == []


def _activate(db_url: str, data_dir: Path, version: str) -> None:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            sync_index_versions(s, data_dir)
            activate_index(s, "default-bluemarble", version)
    finally:
        engine.dispose()


def test_the_verdict_is_versioned_and_reloaded_on_index_swap(make_client, db_url, judged):
    v1, v2 = judged.versions
    # The second index version gets a calibration of its own, with other thresholds.
    own = dict(judged.calibration.localizability)
    own["t_low"], own["t_high"] = 0.25, 0.75
    cal2 = replace(
        judged.calibration,
        version=new_version(),  # this test runs once per database
        index=f"default-bluemarble/{v2}",
        localizability=own,
        path="",
    )
    save_calibration(judged.data_dir, cal2)
    assert list_calibrations(judged.data_dir, "default-bluemarble", v2)[-1] == cal2
    upgrade(db_url)
    _activate(db_url, judged.data_dir, v1)
    with make_client(data_dir=judged.data_dir, locator=judged.locator, index_poll_s=0.05) as client:
        before = client.get("/v1/info").json()["localizability"]
        assert before["version"] == judged.calibration.version
        _activate(db_url, judged.data_dir, v2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if client.get("/readyz").json()["index_version"].endswith(v2):
                break
            time.sleep(0.05)
        after = client.get("/v1/info").json()["localizability"]
        r = client.post("/v1/locate", files={"file": ("t.png", tile_bytes(), "image/png")})
        metrics = client.get("/metrics").text
    assert after["version"] == cal2.version
    assert (after["t_low"], after["t_high"]) == (0.25, 0.75) != (before["t_low"], before["t_high"])
    v = r.json()["localizability"]
    assert r.json()["index_version"].endswith(v2)
    expected = (
        "not_locatable" if v["score"] < 0.25 else "located" if v["score"] >= 0.75 else "uncertain"
    )
    assert v["verdict"] == expected and v["abstained"] == (v["score"] < 0.25)
    # the verdicts are counted, and their scores in a histogram
    assert f'geoloc_verdicts_total{{verdict="{expected}"}} 1.0' in metrics
    assert "geoloc_localizability_score_count 1.0" in metrics


def test_format_1_calibration_files_still_load(judged, bm_model, tmp_path):
    v1 = judged.versions[0]
    d = tmp_path / "data"
    shutil.copytree(judged.data_dir / "indexes", d / "indexes")
    old = json.loads(Path(judged.path).read_text())
    old.pop("localizability")
    old["format"] = 1
    old["weights"] = "bundled"  # as format-1 files say: which bundled weights is not recorded
    folder = d / "calibrations" / "default-bluemarble" / v1
    folder.mkdir(parents=True)
    (folder / "20200101-000000-000000.json").write_text(json.dumps(old))
    cal = load_calibration(
        d,
        "default-bluemarble",
        v1,
        "latest",
        profile="bluemarble",
        weights=weights_label(None, bm_model.weights_id),
    )
    assert cal is not None and cal.format == 1 and cal.localizability is None
    assert cal.temperature == judged.calibration.temperature
    loc = load_locator(Settings(data_dir=d), model=bm_model, index_version=v1)
    assert loc.calibration == cal and loc.judge is None and loc.abstain_threshold is None
    r = loc.locate([Image.new("RGB", (80, 60), (200, 30, 30))], Settings().locate_options())[0]
    assert r.localizability is None and all(c.reliable for c in r.candidates) and r.region

    # Unknown formats and a verdict this code cannot use are refused, not half-applied.
    (folder / "20200101-000000-000000.json").write_text(json.dumps({**old, "format": 3}))
    with pytest.raises(CalibrationError, match="unknown format"):
        list_calibrations(d, "default-bluemarble", v1)
    broken = json.loads(Path(judged.path).read_text())
    broken["localizability"]["features"] = broken["localizability"]["features"][:-1]
    (folder / "20200101-000000-000000.json").write_text(json.dumps(broken))
    with pytest.raises(CalibrationError, match="localizability model cannot be used"):
        load_calibration(
            d,
            "default-bluemarble",
            v1,
            "latest",
            profile="bluemarble",
            weights=weights_label(None, bm_model.weights_id),
        )
    # Listed, it does not hide the calibrations beside it (setup fits a new one after it).
    (cal_broken,) = list_calibrations(d, "default-bluemarble", v1)
    with pytest.raises(CalibrationError, match="localizability model cannot be used"):
        _ = cal_broken.judge
    assert "localizability model cannot be used" in cal_broken.verdict_problem
    assert judged.calibration.verdict_problem == ""


def test_cli_locate_prints_the_verdict_and_eval_counts_abstentions(
    judged, test_negatives, tmp_path, monkeypatch
):
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(judged.data_dir))
    monkeypatch.setenv("GEOLOC_INDEX_VERSION", judged.versions[0])
    page = tmp_path / "page.png"
    next(im for k, im in test_negatives if k == "text").save(page)
    tile = tmp_path / "tile.png"
    tile.write_bytes(tile_bytes(29.5, 84.0))

    result = runner.invoke(app, ["locate", str(page), str(tile), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    verdict_lines = [line for line in lines if "able (" in line or "uncertain (" in line]
    assert len(verdict_lines) == 1, lines  # the tile is located: no verdict line
    line = verdict_lines[0]
    assert line.startswith("  not_locatable (0.")
    assert "): unlike the satellite views of the Earth's surface this model was trained on" in line
    assert line.endswith("; abstained")
    assert lines[lines.index(line) + 2].endswith("(unreliable)")  # after the column header

    out = json.loads(runner.invoke(app, ["locate", str(page), "--json"]).stdout)
    out = out["results"][0]["result"]
    assert out["localizability"]["verdict"] == "not_locatable"
    assert out["candidates"][0]["reliable"] is False

    # eval: images of the domain and generated negatives, labelled with some place.
    csv = tmp_path / "mixed.csv"
    held = write_bluemarble_set(tmp_path / "held", 30, seed=717, kind="test", progress=False)
    rows = [f"{r.path},{r.lat},{r.lon}" for r in read_labelled_csv(held)[0]]
    for i, (_, im) in enumerate(test_negatives[:10]):
        im.save(tmp_path / f"neg{i}.png")
        rows.append(f"{tmp_path / f'neg{i}.png'},10,20")
    csv.write_text("image,lat,lon\n" + "\n".join(rows) + "\n")
    rep = json.loads(runner.invoke(app, ["eval", str(csv), "--json"]).stdout)
    judged_rep = rep["localizability"]
    assert judged_rep["judged"] == rep["n"] == 40
    assert sum(judged_rep["verdicts"].values()) == 40
    assert judged_rep["abstained"] >= 7  # most of the 10 negatives
    assert judged_rep["coverage"] == pytest.approx(1 - judged_rep["abstained"] / 40)
    assert judged_rep["answered"]["n"] == 40 - judged_rep["abstained"]
    assert judged_rep["all"]["n"] == 40 and rep["abstain_below"] == judged.locator.judge.t_low
    text = runner.invoke(app, ["eval", str(csv)]).stdout
    assert "  answered " in text and f"abstained on {judged_rep['abstained']} of 40" in text


def test_negative_kinds_follow_the_profile_domain():
    assert kinds_for("satellite") == KINDS
    photo = kinds_for("photo")
    assert "scene" not in photo and "dead_leaves" not in photo and "text" in photo
    with pytest.raises(ValueError):
        kinds_for("radar")
    # The same seed draws the same pictures; another seed other ones.
    a = [np.asarray(im) for _, im in negatives(("pink_noise", "text"), 2, NEGATIVES_SEED)]
    b = [np.asarray(im) for _, im in negatives(("pink_noise", "text"), 2, NEGATIVES_SEED)]
    c = [np.asarray(im) for _, im in negatives(("pink_noise", "text"), 2, TEST_SEED)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # ``blurred`` blurs only the kinds it is given: blurred flat colours stay flat.
    flat = [np.asarray(im, float) for _, im in negatives(("blurred",), 6, 5, blur_from=("flat",))]
    assert all(x.std(axis=(0, 1)).max() < 8 for x in flat)
    mixed = [np.asarray(im, float) for _, im in negatives(("blurred",), 6, 5)]
    assert max(x.std(axis=(0, 1)).max() for x in mixed) > 8


def test_a_thing_on_a_backdrop_reads_as_framed_and_a_view_of_the_earth_does_not(tmp_path):
    """frame_gap / frame_std: a plain border around a middle unlike it (the Moon on black, a
    product on white) against views of the Earth, which run on past their edges."""
    rng = np.random.default_rng(3)
    things = [im for _, im in negatives(("object",), 40, TEST_SEED)]
    held = write_bluemarble_set(tmp_path / "held", 40, seed=617, kind="test", progress=False)
    tiles = [Image.open(r.path).convert("RGB") for r in read_labelled_csv(held)[0]]
    gap, spread = L.IMAGE_FEATURES.index("frame_gap"), L.IMAGE_FEATURES.index("frame_std")
    a, b = L.image_statistics_many(things), L.image_statistics_many(tiles)
    assert np.median(a[:, gap]) > 2 * np.median(b[:, gap])
    assert np.median(a[:, spread]) < np.median(b[:, spread])
    # A grey disc on black: border plain, middle far from it; noise running past the edges is
    # not framed.
    disc = Image.new("RGB", (96, 80))
    ImageDraw.Draw(disc).ellipse((28, 20, 68, 60), fill=(180, 180, 170))
    noise = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    (d,), (t,) = L.image_statistics_many([disc]), L.image_statistics_many([noise])
    assert d[spread] < 0.01 and d[gap] > 0.5
    assert t[spread] > 0.1 and t[gap] < 0.1
    assert "frame_gap" in L.FEATURES and L.FORMAT >= 5


def test_the_verdict_is_cross_fitted_and_its_score_is_the_folds_mean():
    """Five classifiers, each trained without one fold; thresholds from out-of-fold scores; a
    served score is the classifiers' mean (scored all at once); the same seed, the same fit."""
    rng = np.random.default_rng(8)
    f = len(L.FEATURES)
    pos = rng.normal(0, 1, (300, f))
    neg = rng.normal(1.5, 1.5, (240, f))
    kinds = ["a", "b", "c"] * 80
    model = L.fit_localizability(pos, neg, kinds, purpose="", domain="satellite", seed=3)
    assert len(model.classifiers) == L.FOLDS and model.fit["folds"] == L.FOLDS
    x = np.concatenate([rng.normal(0, 1, (20, f)), rng.normal(1.5, 1.5, (20, f))])
    each = np.mean([c.scores(x) for c in model.classifiers], axis=0)
    np.testing.assert_allclose(model.scores(x), each, rtol=0, atol=1e-12)
    val = model.fit["validation"]
    assert val["in_domain"]["n"] == 300 and val["negatives"]["n"] == 240  # every row, out of fold
    assert 0.005 <= val["in_domain"]["not_locatable"] <= 0.04  # t_low: about 2 % below
    again = L.fit_localizability(pos, neg, kinds, purpose="", domain="satellite", seed=3)
    np.testing.assert_array_equal(again.scores(x), model.scores(x))
    assert (again.t_low, again.t_high) == (model.t_low, model.t_high)
    restored = L.LocalizabilityModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(restored.scores(x), model.scores(x), rtol=0, atol=1e-12)


def test_too_few_negatives_of_a_kind_for_the_folds_is_refused_clearly():
    f = len(L.FEATURES)
    pos, neg = np.zeros((40, f)), np.ones((2 * (L.FOLDS - 1), f))
    with pytest.raises(ValueError, match="GEOLOC_CALIBRATION_NEGATIVES"):
        L.fit_localizability(pos, neg, ["a", "b"] * (L.FOLDS - 1), purpose="", domain="satellite")
    with pytest.raises(ValueError, match="blur_from"):
        next(negatives(("blurred",), 1, 5, blur_from=("blurred",)))


def test_the_statistics_own_mean_and_std_are_numpy_s_bit_for_bit():
    rng = np.random.default_rng(11)
    for shape, axis in (((3, 4096), 1), ((2, 3, 4096), 2), ((5, 16, 256), 2), ((1, 7), 1)):
        a = rng.random(shape, dtype=np.float32) * rng.uniform(0.1, 10)
        np.testing.assert_array_equal(L._mean(a, axis), a.mean(axis=axis))
        np.testing.assert_array_equal(L._std(a, axis), a.std(axis=axis))
