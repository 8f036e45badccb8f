"""Text queries end to end: POST /v1/locate/text and `geoloc locate --text` with a profile that
has a text tower (tests/text_profile.py: built through the profile registry, random weights),
and a clear 422 for bluemarble, which has none."""

from __future__ import annotations

import json

import numpy as np
import pytest
from api_helpers import assert_problem
from typer.testing import CliRunner

from encoders import load_model
from encoders.model import save_checkpoint
from encoders.profiles import build_model
from index.geocode import ReverseGeocoder
from index.store import load_index
from service.cli.main import app as cli_app
from service.config import Settings
from service.engine.locator import Locator
from service.engine.options import LocateOptions
from service.jobs.indexes import GallerySpec, build_index
from tests.text_profile import TINY_TEXT, registered

pytest_plugins = ["api_fixtures"]  # the bluemarble model, index and app fixtures

DESERT = "a sandy desert with dunes"


@pytest.fixture
def db_url(tmp_path) -> str:
    """SQLite only: what is tested here does not depend on the database."""
    return f"sqlite:///{tmp_path / 'geoloc.db'}"


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """The tiny text profile registered, its weights in a checkpoint, an index for it."""
    root = tmp_path_factory.mktemp("text")
    with registered():
        checkpoint = root / "tiny-text.pt"
        save_checkpoint(build_model(TINY_TEXT), checkpoint, config=TINY_TEXT.to_dict())
        model = load_model(TINY_TEXT.name, checkpoint=checkpoint)
        s = Settings(data_dir=root / "data")
        spec = GallerySpec(kind="h3", res=1)
        build_index(s, f"default-{TINY_TEXT.name}", spec, model=model, progress=False)
        index = load_index(s.data_dir, f"default-{TINY_TEXT.name}")
        yield Locator(model, index, ReverseGeocoder()), checkpoint, s.data_dir


def test_locate_text_answers_with_the_text_towers_candidates(make_client, text_setup):
    locator = text_setup[0]
    with make_client(locator=locator) as client:
        r = client.post("/v1/locate/text", json={"text": f"  {DESERT} ", "top_k": 3})
        other = client.post("/v1/locate/text", json={"text": "an ice sheet", "top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        stored = client.get(f"/v1/predictions/{body['prediction_id']}")
    assert body["profile"] == TINY_TEXT.name and len(body["candidates"]) == 3
    assert body["llm"]["status"] == "skipped" and "text" in body["llm"]["reason"]
    direct = locator.locate_texts([DESERT], LocateOptions(top_k=3))[0]
    assert [(c["lat"], c["lon"]) for c in body["candidates"]] == [
        (c.lat, c.lon) for c in direct.candidates
    ]
    # The score is the cosine of the text's embedding and the place's GPS embedding.
    query = locator.model.embed_texts([DESERT])[0]
    top = body["candidates"][0]
    place = locator.model.embed_gps(np.array([[top["lat"], top["lon"]]]))[0]
    assert top["score"] == pytest.approx(float(place @ query), abs=1e-5)
    assert [c["score"] for c in other.json()["candidates"]] != [
        c["score"] for c in body["candidates"]
    ]
    assert stored.status_code == 200


def test_text_query_limits_are_clear_422s(make_client, text_setup):
    with make_client(locator=text_setup[0], max_text_chars=40) as client:
        assert_problem(client.post("/v1/locate/text", json={"text": "   "}), 422, "invalid-option")
        long = client.post("/v1/locate/text", json={"text": "x" * 41})
        assert "GEOLOC_MAX_TEXT_CHARS" in assert_problem(long, 422, "invalid-option")["detail"]
        assert_problem(client.post("/v1/locate/text", json={}), 422, "invalid-request")
        extra = client.post("/v1/locate/text", json={"text": DESERT, "image_base64": "x"})
        assert_problem(extra, 422, "invalid-request")
        bad_top_k = client.post("/v1/locate/text", json={"text": DESERT, "top_k": 10_000})
        assert_problem(bad_top_k, 422, "invalid-option")


def test_a_profile_without_a_text_tower_answers_422_text_not_supported(make_client):
    with make_client() as client:  # the bundled bluemarble profile
        r = client.post("/v1/locate/text", json={"text": DESERT})
        body = assert_problem(r, 422, "text-not-supported")
        assert "bluemarble" in body["detail"] and "geoclip" in body["detail"]
        assert "/v1/locate/text" in client.get("/openapi.json").json()["paths"]


runner = CliRunner()


def test_cli_locate_text(text_setup, monkeypatch):
    _, checkpoint, data_dir = text_setup
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(data_dir))
    monkeypatch.setenv("GEOLOC_PROFILE", TINY_TEXT.name)
    monkeypatch.setenv("GEOLOC_CHECKPOINT", str(checkpoint))
    with registered():
        result = runner.invoke(cli_app, ["locate", "--text", DESERT, "--top-k", "2", "--json"])
        assert result.exit_code == 0, result.output
        (out,) = json.loads(result.output)["results"]
        assert out["input"] == DESERT and len(out["result"]["candidates"]) == 2
        plain = runner.invoke(cli_app, ["locate", "--text", DESERT])
        assert plain.exit_code == 0 and plain.output.startswith(f"{DESERT}  ({TINY_TEXT.name}")
        both = runner.invoke(cli_app, ["locate", "a.jpg", "--text", DESERT])
        assert both.exit_code == 2 and "not both" in both.output


def test_cli_locate_text_with_bluemarble_is_one_error_line(bm_index, monkeypatch):
    monkeypatch.setenv("GEOLOC_DATA_DIR", str(bm_index.data_dir))
    monkeypatch.setenv("GEOLOC_INDEX_VERSION", bm_index.versions[0])
    result = runner.invoke(cli_app, ["locate", "--text", DESERT])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error: [text-not-supported] profile 'bluemarble'")
