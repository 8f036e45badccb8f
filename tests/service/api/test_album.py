"""POST /v1/locate/album: the joint answer, each picture's own answer and weight, bad pictures,
limits, and what is stored (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import json
import re

import pytest
from api_helpers import assert_problem, tile_bytes

pytest_plugins = ["api_fixtures"]

#: Three views of Lake Chad's surroundings (a few tens of km apart) and one of Greenland.
SAHEL = [(13.0, 14.0), (13.2, 14.3), (12.8, 13.8)]
GREENLAND = (72.0, -40.0)


def files(points, fmt="PNG", size=64):
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return [
        ("files", (f"v{i}.{fmt.lower()}", tile_bytes(a, o, fmt, size), mime))
        for i, (a, o) in enumerate(points)
    ]


def test_album_answers_jointly_and_stores_every_answer(make_client):
    with make_client() as client:
        r = client.post("/v1/locate/album", files=files([*SAHEL, GREENLAND]), params={"top_k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        # The joint answer has every field of a locate answer.
        for key in ("prediction_id", "candidates", "region", "countries", "stages", "timings_ms"):
            assert key in body
        assert "combine" in body["stages"] and len(body["candidates"]) <= 3
        assert body["used"] == 4 and [i["index"] for i in body["images"]] == [0, 1, 2, 3]
        weights = [i["weight"] for i in body["images"]]
        assert sum(weights) == pytest.approx(1.0)
        # Greenland is far from the three others: an outlier with little weight.
        far = body["images"][3]
        assert far["outlier"] and far["weight"] < 0.1, far
        assert not any(i["outlier"] for i in body["images"][:3])
        top = body["candidates"][0]
        assert abs(top["lat"] - 13.0) < 5 and abs(top["lon"] - 14.0) < 5, top
        # Each picture's own answer is a stored prediction; the album's too, naming them.
        own = [i["result"]["prediction_id"] for i in body["images"]]
        assert all(own) and len({*own, body["prediction_id"]}) == 5
        stored = client.get(f"/v1/predictions/{body['prediction_id']}").json()
        album = stored["result"]["album"]
        assert [i["prediction_id"] for i in album["images"]] == own
        assert album["images"][3]["outlier"] is True
        assert client.get(f"/v1/predictions/{own[0]}").status_code == 200
        # Feedback on the album applies to its joint answer.
        fb = client.post(
            f"/v1/predictions/{body['prediction_id']}/feedback", json={"lat": 13.0, "lon": 14.0}
        )
        assert fb.status_code == 200, fb.text
        assert fb.json()["error_km"] < 600


def test_album_of_mixed_sizes_and_formats_and_json(make_client):
    mixed = [
        ("files", ("a.png", tile_bytes(*SAHEL[0], "PNG", 64), "image/png")),
        ("files", ("b.jpg", tile_bytes(*SAHEL[1], "JPEG", 200), "image/jpeg")),
        ("files", ("c.webp", tile_bytes(*SAHEL[2], "WEBP", 97), "image/webp")),
    ]
    with make_client() as client:
        r = client.post("/v1/locate/album", files=mixed)
        assert r.status_code == 200, r.text
        assert r.json()["used"] == 3
        b64 = [base64.b64encode(tile_bytes(a, o)).decode() for a, o in SAHEL[:2]]
        r = client.post("/v1/locate/album", json={"images_base64": b64, "top_k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["used"] == 2 and len(body["candidates"]) <= 2
        assert [i["filename"] for i in body["images"]] == [None, None]


def test_a_bad_picture_is_its_own_problem_while_the_album_answers(make_client):
    bad = ("files", ("notes.txt", b"this is not an image", "image/jpeg"))
    with make_client() as client:
        r = client.post("/v1/locate/album", files=[*files(SAHEL[:2]), bad])
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["used"] == 2
        item = body["images"][2]
        assert item["result"] is None and item["weight"] == 0.0
        assert item["problem"]["type"].endswith("/unsupported-media-type")
        assert item["problem"]["instance"] == "/v1/locate/album#2"
        assert any("1 of 3 pictures could not be used" in w for w in body["warnings"])
        # JSON: one picture that is not base64 is a problem of its own too.
        good = base64.b64encode(tile_bytes(*SAHEL[0])).decode()
        r = client.post("/v1/locate/album", json={"images_base64": [good, good, "%%%"]})
        assert r.status_code == 200, r.text
        assert r.json()["images"][2]["problem"]["type"].endswith("/invalid-base64")
        # Fewer than two usable pictures: no answer.
        p = assert_problem(
            client.post("/v1/locate/album", files=[*files(SAHEL[:1]), bad]),
            422,
            "album-too-small",
        )
        assert "1 of 2" in p["detail"] and "#1" in p["detail"]
        assert_problem(
            client.post("/v1/locate/album", files=files(SAHEL[:1])), 422, "album-too-small"
        )


def test_album_limits(make_client):
    with make_client(max_album=3) as client:
        four = files([*SAHEL, GREENLAND])
        assert_problem(client.post("/v1/locate/album", files=four), 422, "too-many-images")
        b64 = [base64.b64encode(tile_bytes()).decode()] * 4
        assert_problem(
            client.post("/v1/locate/album", json={"images_base64": b64}), 422, "too-many-images"
        )
        assert_problem(
            client.post("/v1/locate/album", json={"images_base64": b64[:2], "nope": 1}),
            422,
            "invalid-request",
        )
        assert_problem(
            client.post("/v1/locate/album", files={"file": ("a.png", tile_bytes(), "image/png")}),
            422,
            "missing-image",
        )
        assert_problem(
            client.post("/v1/locate/album", content=b"x", headers={"content-type": "text/plain"}),
            415,
            "unsupported-content-type",
        )
        assert_problem(
            client.post("/v1/locate/album", files=files(SAHEL[:2]), params={"top_k": 10_000}),
            422,
            "invalid-option",
        )
        assert client.get("/v1/info").json()["limits"]["max_album"] == 3
        document = client.get("/openapi.json").json()
        spec = document["paths"]["/v1/locate/album"]["post"]
        schema = spec["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert schema["properties"]["files"]["maxItems"] == 3
        # Every $ref of the document names a schema it defines (the JSON body included).
        refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
        assert "AlbumJSONRequest" in refs
        assert refs <= set(document["components"]["schemas"]), refs - set(
            document["components"]["schemas"]
        )


def test_an_album_may_say_how_far_apart_its_pictures_were_taken(make_client):
    b64 = [base64.b64encode(tile_bytes(a, o)).decode() for a, o in SAHEL]
    with make_client() as client:

        def sources(params: dict | None = None, body: dict | None = None) -> list[str]:
            if body is None:
                r = client.post("/v1/locate/album", files=files(SAHEL), params=params)
            else:
                json_body = {"images_base64": b64, **body}
                r = client.post("/v1/locate/album", json=json_body, params=params)
            assert r.status_code == 200, r.text
            return [c["source"] for c in r.json()["candidates"]]

        # The default spread (GEOLOC_ALBUM_SPREAD_KM, 25 km) puts the pictures' mean place first;
        # a spread of 0 (one spot) never scores it, by query parameter or JSON body field.
        assert sources(params={"top_k": 5})[0] == "album"
        assert "album" not in sources(params={"top_k": 5, "spread_km": 0})
        assert "album" not in sources(body={"top_k": 5, "spread_km": 0})
        # A JSON body's spread overrides the query's, as every other option.
        assert sources(params={"spread_km": 0}, body={"spread_km": 25})[0] == "album"
        assert "album" not in sources(params={"spread_km": 0}, body={"top_k": 5})
        # The answer says which spread it assumed, and so does its stored record.
        for params, spread in (({}, 25.0), ({"spread_km": 7.5}, 7.5)):
            r = client.post("/v1/locate/album", files=files(SAHEL), params=params)
            assert r.json()["spread_km"] == spread
            stored = client.get(f"/v1/predictions/{r.json()['prediction_id']}").json()
            assert stored["result"]["album"]["spread_km"] == spread
        for bad in (-1, 5000, "far"):
            assert_problem(
                client.post("/v1/locate/album", files=files(SAHEL), params={"spread_km": bad}),
                422,
                "invalid-request",
            )
        assert_problem(
            client.post("/v1/locate/album", json={"images_base64": b64, "spread_km": 5000}),
            422,
            "invalid-request",
        )
