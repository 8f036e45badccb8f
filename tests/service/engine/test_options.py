"""Each locate option is declared once (service/engine/options.py): the settings take their names,
types and defaults from it, and the HTTP request model and the CLI expose only options it
declares, within bounds it accepts."""

from __future__ import annotations

import math
from dataclasses import fields

import pytest

from service.api.schemas import LocateRequestOptions
from service.config import Settings
from service.engine.options import SERVICE_OPTIONS, LocateOptions
from service.errors import InvalidOptionError

DECLARED = {f.name: f for f in fields(LocateOptions)}
LIMITS = {
    "max_top_k": Settings().max_top_k,
    "max_retrieve_k": Settings().max_retrieve_k,
    "max_nprobe": Settings().max_nprobe,
    "max_rerank_k": Settings().max_rerank_k,
}


def accepts(**option: object) -> bool:
    try:
        LocateOptions(**option).validate(**LIMITS)  # type: ignore[arg-type]
    except InvalidOptionError:
        return False
    return True


def test_settings_take_every_service_option_from_the_declaration(monkeypatch) -> None:
    declared_in_settings = set(DECLARED) & set(Settings.model_fields)
    assert declared_in_settings == set(SERVICE_OPTIONS)
    defaults = LocateOptions()
    for name in SERVICE_OPTIONS:
        assert Settings.model_fields[name].default == getattr(defaults, name), name
    assert Settings().locate_options() == defaults
    monkeypatch.setenv("GEOLOC_STRUCTURE_WEIGHT", "0.25")
    monkeypatch.setenv("GEOLOC_TOP_K", "3")
    assert Settings().locate_options() == LocateOptions(structure_weight=0.25, top_k=3)


def test_the_request_model_names_only_declared_options() -> None:
    assert set(LocateRequestOptions.model_fields) <= set(DECLARED)


def _bounds(name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in LocateRequestOptions.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                out[key] = getattr(m, key)
    return out


NUMERIC = [
    name
    for name, f in LocateRequestOptions.model_fields.items()
    if _bounds(name) and name in DECLARED
]


@pytest.mark.parametrize("name", NUMERIC)
def test_request_bounds_agree_with_the_options_checks(name: str) -> None:
    """What the request model lets through, the options accept; just past a bound both the
    request model and (where the option has no other meaning there) the options refuse."""
    b = _bounds(name)
    integer = LocateRequestOptions.model_fields[name].annotation in (int | None, int)
    step = 1 if integer else 1e-6
    base = {"top_k": 1} if name == "retrieve_k" else {}
    if "ge" in b:
        assert accepts(**base, **{name: b["ge"]}), f"{name}={b['ge']} passes the request model"
    if "gt" in b:
        assert accepts(**base, **{name: b["gt"] + step})
    if "le" in b:
        assert accepts(**base, **{name: b["le"]}), f"{name}={b['le']} passes the request model"
        assert not accepts(**base, **{name: b["le"] + step})
    if "lt" in b:
        assert not accepts(**base, **{name: b["lt"]})
    if "le" not in b and "lt" not in b:  # the upper limit is a setting: max_<name>
        limit = LIMITS.get(f"max_{name}")
        assert limit is not None, f"{name} has no upper bound in the request or the settings"
        assert accepts(**base, **{name: limit}) and not accepts(**base, **{name: limit + 1})
    low = b.get("ge", b.get("gt"))
    assert low is not None and math.isfinite(low)


#: `geoloc locate` parameters that are about the command, not the pipeline.
LOCATE_COMMAND_ONLY = {
    "images",
    "text",
    "as_json",
    "profile",
    "index",
    "batch_size",
    "album",
    "spread_km",  # an album's, not a locate option (AlbumConfig)
}
#: CLI parameters named for one use (``--country FR --country ES``) and the option they fill.
CLI_NAMES = {"country": "countries"}


def test_the_cli_names_only_declared_options() -> None:
    """Every `geoloc locate` parameter is a declared option (default: unset, i.e. the
    settings', or the option's own default) or one of the command's own."""
    import inspect

    from service.cli.locate import locate_cmd

    defaults = LocateOptions()
    params = inspect.signature(locate_cmd).parameters
    cli_options = {CLI_NAMES.get(n, n): n for n in params if n not in LOCATE_COMMAND_ONLY}
    assert set(cli_options) <= set(DECLARED), set(cli_options) - set(DECLARED)
    for name, param in cli_options.items():
        default = params[param].default
        if name in ("bbox", "countries"):  # parsed from text: "" / no --country means none
            assert default in ("", None), name
        else:
            assert default is None or default == getattr(defaults, name), name


def test_the_openapi_schema_states_the_limits_that_are_settings() -> None:
    """top_k <= GEOLOC_MAX_TOP_K and the rest are checked after parsing; the schema a client
    reads says so, in the JSON bodies and in /v1/locate's query parameters."""
    from service.api.main import create_app
    from service.api.openapi import SETTING_MAXIMA

    settings = Settings(max_top_k=7, max_nprobe=9, max_rerank_k=11, max_retrieve_k=300)
    doc = create_app(settings).openapi()

    def maximum(schema: dict) -> int | None:
        return next((b.get("maximum") for b in schema.get("anyOf", [schema]) if "type" in b), None)

    body = doc["components"]["schemas"]["LocateJSONRequest"]["properties"]
    query = {p["name"]: p["schema"] for p in doc["paths"]["/v1/locate"]["post"]["parameters"]}
    for name, setting in SETTING_MAXIMA.items():
        for where in (body, query):
            if name in where:
                assert maximum(where[name]) == getattr(settings, setting), name
    assert maximum(body["top_k"]) == 7 and maximum(query["top_k"]) == 7


def test_messages_state_the_real_bounds() -> None:
    """A refused value is answered with the bounds a request may use (a request cannot send
    nprobe 0: unset means the index's own)."""
    with pytest.raises(InvalidOptionError) as exc:
        LocateOptions(nprobe=LIMITS["max_nprobe"] + 1).validate(**LIMITS)
    assert f"between 1 and {LIMITS['max_nprobe']}" in str(exc.value)
    assert "0:" not in str(exc.value)
