"""`geoloc calibrate` and `geoloc eval` on small Blue Marble held-out sets made here with the
bundled model: the temperature lowers the ECE on other tiles without changing any answer, is
stored versioned beside the index, and the locator picks it up; eval's JSON, plots, compare."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from encoders import load_model
from encoders.bluemarble import render_tile
from service.cli.main import app
from service.config import Settings
from service.engine.calibration import (
    CalibrationError,
    list_calibrations,
    load_calibration,
    save_calibration,
)
from service.engine.loading import load_locator
from service.jobs.calibrate import prepare_cases, top1
from service.jobs.indexes import GallerySpec, build_index
from service.jobs.training import write_bluemarble_set

runner = CliRunner()
TILES = 200  # per set: enough for a stable ECE, small enough for a test


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data dir with a res-2 index, a fitting set and an evaluation set (other seeds)."""
    root = tmp_path_factory.mktemp("calib")
    data_dir = root / "data"
    model = load_model("bluemarble")
    build_index(
        Settings(data_dir=data_dir), "default-bluemarble", GallerySpec("h3", 2), model=model,
        progress=False,
    )  # fmt: skip
    fit = write_bluemarble_set(root / "fit", TILES, seed=101, kind="test", progress=False)
    held = write_bluemarble_set(root / "held", TILES, seed=202, kind="test", progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GEOLOC_DATA_DIR", str(data_dir))
        index_files = _tree_digest(data_dir / "indexes")
        before = json.loads(cli("eval", str(held), "--json"))
        # The temperature alone: the localizability verdict has tests of its own.
        out = cli("calibrate", str(fit), "--no-localizability")
        after = json.loads(cli("eval", str(held), "--json"))
        yield {
            "root": root,
            "data_dir": data_dir,
            "fit": fit,
            "held": held,
            "model": model,
            "index_files": index_files,
            "calibrate_output": out,
            "before": before,
            "after": after,
        }


def test_calibrate_lowers_ece_on_other_tiles_without_changing_top1(world):
    before, after = world["before"], world["after"]
    assert before["temperature"] == 1.0 and before["calibration_version"] is None
    assert after["temperature"] != 1.0 and after["calibration_version"]
    assert after["calibration"]["ece"] < before["calibration"]["ece"], (
        before["calibration"],
        after["calibration"],
    )
    # The answers are the same: only the stated probabilities moved.
    for key in ("n", "within_km", "median_km", "mean_geoscore", "by_country"):
        assert after[key] == before[key], key
    assert after["calibration"]["accuracy"] == before["calibration"]["accuracy"]
    assert "temperature" in world["calibrate_output"] and "stored" in world["calibrate_output"]


def test_the_calibration_is_a_versioned_artifact_beside_the_untouched_index(world, monkeypatch):
    data_dir = world["data_dir"]
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(data_dir))
    assert _tree_digest(data_dir / "indexes") == world["index_files"]
    s = Settings()
    loc = load_locator(s)
    m = loc.index.manifest
    (first,) = list_calibrations(data_dir, m.name, m.version)
    raw = json.loads(Path(first.path).read_text())
    assert raw["index"] == f"{m.name}/{m.version}" and raw["profile"] == "bluemarble"
    assert raw["data"]["rows"] == TILES and len(raw["data"]["sha256"]) == 64
    assert raw["data"]["path"] == str(world["fit"].resolve())
    assert raw["fit"]["after"]["log_loss"] < raw["fit"]["before"]["log_loss"]
    assert raw["format"] == 2 and raw["created_at"]
    assert raw["weights"] == f"bundled:{world['model'].weights_id}"
    assert raw["localizability"] is None and loc.judge is None  # --no-localizability
    assert loc.calibration == first  # the service's loader picks the newest up

    # A new fit is a new version; the first stays as it was and can still be chosen.
    digest = hashlib.sha256(Path(first.path).read_bytes()).hexdigest()
    cli(
        "calibrate", str(world["fit"]), "--limit", "60", "--within-km", "200", "--no-localizability"
    )
    cals = list_calibrations(data_dir, m.name, m.version)
    assert len(cals) == 2 and cals[0] == first and cals[1].within_km == 200
    assert hashlib.sha256(Path(first.path).read_bytes()).hexdigest() == digest
    assert load_locator(s).calibration == cals[1]
    pinned = s.model_copy(update={"calibration": first.version})
    assert load_locator(pinned).calibration == first
    assert load_locator(s.model_copy(update={"calibration": "off"})).calibration is None
    with pytest.raises(CalibrationError, match="no calibration"):
        load_locator(s.model_copy(update={"calibration": "20000101-000000-000000"}))
    with pytest.raises(CalibrationError, match="exists already"):
        save_calibration(data_dir, first)
    # A calibration fitted for other weights is refused, not silently applied.
    with pytest.raises(CalibrationError, match="fitted for profile"):
        load_calibration(
            data_dir, m.name, m.version, "latest", profile="bluemarble", weights="/other.pt"
        )
    assert "calibration" in cli("eval", "--help")  # eval can switch it off or pin a temperature


def test_the_pipeline_states_the_probabilities_the_fit_computed(world):
    s = Settings(data_dir=world["data_dir"], calibration="off")
    loc = load_locator(s, model=world["model"])
    places = [(23.0, 12.0), (29.5, 84.0), (-4.0, -63.0), (-25.0, 133.0), (55.0, 100.0)]
    q = loc.embed([render_tile(lat, lon, 1.8, 64) for lat, lon in places])
    opts = s.locate_options(top_k=3, describe=False)
    cases = prepare_cases(
        loc.candidate_logits(q, opts), np.array(places), nms_km=opts.nms_km, diversify=True
    )
    plain = loc.locate_embeddings(q, opts)
    for t in (0.3, 2.5):
        hot = loc.locate_embeddings(q, replace(opts, temperature=t))
        conf, _ = top1(cases, t)
        for a, b, c in zip(plain, hot, conf, strict=True):
            assert [(x.lat, x.lon) for x in a.candidates] == [(x.lat, x.lon) for x in b.candidates]
            assert b.candidates[0].probability == pytest.approx(c, rel=1e-9)
        assert not np.allclose(conf, top1(cases, 1.0)[0])


def test_eval_json_plots_and_compare(world, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(world["data_dir"]))
    rep = world["after"]
    for key in ("by_continent", "by_country", "recall_vs_area", "calibration", "error_cdf_km"):
        assert key in rep
    rva = rep["recall_vs_area"]
    assert set(rva["area_km2_at_recall"]) == {"0.5", "0.9"}
    assert rep["calibration"]["within_km"] == 50 and rep["region_res"] == 3
    assert sum(v["n"] for v in rep["by_continent"].values()) == rep["n"] == TILES

    other = tmp_path / "uncalibrated.json"
    other.write_text(json.dumps(world["before"]))
    plots = tmp_path / "plots"
    text = cli(
        "eval", str(world["held"]), "--limit", "40", "--plots", str(plots),
        "--compare", str(other), "--label", "calibrated", "--within-km", "200", "--bins", "5",
    )  # fmt: skip
    assert "by continent" in text and "recall vs area" in text and "ECE" in text
    files = sorted(p.name for p in plots.iterdir())
    assert files == ["error_cdf.png", "error_map.png", "recall_vs_area.png", "reliability.png"]
    for p in plots.iterdir():
        head = p.read_bytes()[:8]
        assert head == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2_000, p

    bad = tmp_path / "bad.json"
    bad.write_text('{"n": 3}')
    result = runner.invoke(app, ["eval", str(world["held"]), "--compare", str(bad)])
    assert result.exit_code == 2 and "not the output of `geoloc eval --json`" in result.output


def test_the_fit_lifts_a_near_copy_at_each_temperature_as_served():
    """A near copy's place holds NEAR_COPY_ODDS / (1 + NEAR_COPY_ODDS) of the mass at every
    temperature the fit tries, as the pipeline states it (``lift_near_copy``), not only at
    temperature 1, where candidate_logits lifted it."""
    from service.engine.locator import NEAR_COPY_ODDS
    from service.engine.places import lift_near_copy

    latlon = np.array([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [-40.0, 50.0]])
    raw = np.array([5.0, 4.5, 4.0, 3.5, 0.0])  # the copy is the last point
    lifted = lift_near_copy(raw, 4, NEAR_COPY_ODDS)  # as candidate_logits gives it
    truth = np.array([[-40.0, 50.0]])
    (case,) = prepare_cases([(latlon, lifted, 4)], truth, nms_km=50.0, diversify=True)
    (plain,) = prepare_cases([(latlon, lifted, None)], truth, nms_km=50.0, diversify=True)
    assert case.d_km < 1.0  # its place is the first
    share = NEAR_COPY_ODDS / (1 + NEAR_COPY_ODDS)
    for t in (0.5, 1.0, 3.0):
        conf, _ = top1([case], t)
        served = lift_near_copy(raw, 4, NEAR_COPY_ODDS, t) / t
        p = np.exp(served - served.max())
        assert conf[0] == pytest.approx(p[4] / p.sum(), rel=1e-9)
        assert conf[0] >= share - 1e-9
    assert top1([plain], 3.0)[0][0] < share  # without it the temperature softens the copy
