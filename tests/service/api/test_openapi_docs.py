"""The OpenAPI document explains the answers: every field of every schema a response uses has a
description, every response model has an example, and the examples are what the models accept
(pydantic, round trip) and what the document's own JSON Schema says.

The app is built as the other API tests build it (create_app with test settings), without its
lifespan: the document needs no model, index or database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from service.api import schemas
from service.api.main import create_app
from service.api.openapi import FIELD_DOCS, MODEL_EXAMPLES
from service.api.problems import Problem
from service.config import Settings
from service.engine import llm_stages

REF = "#/components/schemas/"


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("openapi")
    settings = Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'geoloc.db'}",
        auth_enabled=True,  # every problem a route can answer with
        url_fetch_enabled=True,
    )
    return create_app(settings).openapi()


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF):
            yield ref[len(REF) :]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _responses(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, response in op.get("responses", {}).items():
                yield f"{method.upper()} {path} {status}", response


def _response_models(doc: dict[str, Any]) -> set[str]:
    """The schemas responses name directly."""
    return {name for _, response in _responses(doc) for name in _refs(response)}


def _response_schemas(doc: dict[str, Any]) -> set[str]:
    """Every schema a response uses, nested ones included."""
    components = doc["components"]["schemas"]
    seen: set[str] = set()
    todo = list(_response_models(doc))
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_refs(components[name]))
    return seen


def _model(name: str) -> type[BaseModel]:
    model = Problem if name == "Problem" else getattr(schemas, name)
    assert issubclass(model, BaseModel), name
    return model


def test_every_response_has_a_schema_and_a_description(doc):
    for where, response in _responses(doc):
        assert response.get("description"), where
        assert response.get("content"), where  # no answer without a documented body


def test_the_response_models_are_the_api_models(doc):
    models = _response_models(doc)
    assert {"LocateResponse", "BatchResponse", "PredictionOut", "FeedbackOut"} <= models
    assert {"StatsOut", "InfoOut", "HealthOut", "ReadyOut", "ActivateOut", "Problem"} <= models
    nested = _response_schemas(doc) - models
    assert {"CandidateOut", "RegionOut", "LocalizabilityOut", "LLMReport"} <= nested


def test_every_property_of_every_response_schema_has_a_description(doc):
    components = doc["components"]["schemas"]
    undescribed = [
        f"{name}.{prop}"
        for name in sorted(_response_schemas(doc))
        for prop, schema in components[name].get("properties", {}).items()
        if not str(schema.get("description", "")).strip()
    ]
    assert undescribed == []


def test_every_response_model_has_a_description_and_an_example(doc):
    components = doc["components"]["schemas"]
    for name in sorted(_response_models(doc)):
        assert components[name].get("description"), name
        assert components[name].get("examples"), name


@pytest.mark.parametrize(
    "name",
    sorted(
        {"LocateResponse", "BatchResponse", "PredictionOut", "FeedbackOut", "StatsOut"}
        | {"InfoOut", "HealthOut", "ReadyOut", "ActivateOut", "Problem"}
    ),
)
def test_examples_validate_against_their_models(doc, name):
    """Each example is accepted as it stands: no key dropped, no value coerced."""
    model = _model(name)
    for example in doc["components"]["schemas"][name]["examples"]:
        parsed = model.model_validate(example, strict=False)
        assert parsed.model_dump(mode="json", exclude_unset=True) == example


def test_examples_validate_against_the_document(doc, tmp_path: Path):
    """The examples of models, of fields and of responses against the document's JSON Schema,
    $refs and all (OpenAPI 3.1 schemas are JSON Schema 2020-12)."""
    jsonschema = pytest.importorskip("jsonschema")
    components = doc["components"]["schemas"]

    def check(schema: dict[str, Any], value: Any, where: str) -> None:
        rooted = {**_rebase(schema), "$defs": _rebase(components)}
        errors = list(jsonschema.Draft202012Validator(rooted).iter_errors(value))
        assert not errors, (where, [e.message for e in errors[:3]])

    checked = 0
    for name, schema in components.items():
        for example in schema.get("examples", []):
            check(schema, example, name)
            checked += 1
        for prop, sub in schema.get("properties", {}).items():
            for example in sub.get("examples", []):
                check(sub, example, f"{name}.{prop}")
                checked += 1
    for where, response in _responses(doc):
        for media_type, body in response.get("content", {}).items():
            if "example" in body:
                check(body["schema"], body["example"], f"{where} {media_type}")
                checked += 1
    assert checked >= 20


def test_each_problem_response_shows_a_problem_of_its_status(doc):
    """Not one shared example under every status: a 404 shows a 404."""
    seen = 0
    for where, response in _responses(doc):
        body = response.get("content", {}).get("application/problem+json")
        if body is None:
            continue
        example = body["example"]
        Problem.model_validate(example)
        assert str(example["status"]) == where.split()[-1], where
        assert example["type"].startswith("https://geoloc.dev/problems/"), where
        seen += 1
    assert seen > 50


def _rebase(node: Any) -> Any:
    """#/components/schemas/X -> #/$defs/X, so that a schema can stand alone."""
    if isinstance(node, dict):
        return {
            k: (v.replace(REF, "#/$defs/") if k == "$ref" else _rebase(v)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase(v) for v in node]
    return node


def test_probability_says_what_it_means(doc):
    components = doc["components"]["schemas"]
    text = components["CandidateOut"]["properties"]["probability"]["description"]
    assert "GEOLOC_CALIBRATION_KM" in text and "within" in text
    assert "calibrat" in components["CalibrationInfo"]["properties"]["within_km"]["description"]
    verdict = components["LocalizabilityOut"]["properties"]["verdict"]
    assert set(verdict["enum"]) == {"located", "uncertain", "not_locatable"}


def test_the_descriptions_of_foreign_models_name_real_fields():
    """FIELD_DOCS and MODEL_EXAMPLES describe models defined outside the API: an entry for a
    field that is gone (or already described by its model) is stale."""
    models: dict[str, type[BaseModel]] = {
        "Problem": Problem,
        "LLMReport": llm_stages.LLMReport,
        "DiversifyReport": llm_stages.DiversifyReport,
        "RerankReport": llm_stages.RerankReport,
        "Proposal": llm_stages.Proposal,
    }
    for name, fields in FIELD_DOCS.items():
        model_fields = models[name].model_fields
        for field in fields:
            assert field in model_fields, f"{name}.{field} is not a field"
            assert model_fields[field].description is None, f"{name}.{field}: described twice"
    for name, examples in MODEL_EXAMPLES.items():
        for example in examples:
            models[name].model_validate(example)
