"""The OpenAPI document: what the routes declare that depends on the settings (the security
requirement and the auth problems when GEOLOC_AUTH_ENABLED, the batch size), the request
bodies the routes read themselves, and the schemas and security schemes added to the
generated document."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.api.problems import Problem
from service.api.schemas import LocateJSONRequest
from service.config import Settings


@dataclass(frozen=True)
class RouteDocs:
    """The settings-dependent parts of a route's OpenAPI declaration."""

    auth_enabled: bool
    max_batch: int

    @classmethod
    def of(cls, settings: Settings) -> RouteDocs:
        return cls(auth_enabled=settings.auth_enabled, max_batch=settings.max_batch)

    @property
    def secured(self) -> dict[str, Any]:
        """``openapi_extra=`` of a route that takes an API key."""
        return {"security": [{"bearer": []}, {"apiKey": []}]} if self.auth_enabled else {}

    @property
    def auth_errors(self) -> tuple[int, ...]:
        """The problems of the API-key check and the rate limit."""
        return (401, 403, 429) if self.auth_enabled else (429,)


MULTIPART_ONE = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}},
    "additionalProperties": False,
}


def multipart_many(max_batch: int) -> dict[str, Any]:
    files = {"type": "array", "items": {"type": "string", "format": "binary"}}
    return {
        "type": "object",
        "required": ["files"],
        "properties": {"files": {**files, "minItems": 1, "maxItems": max_batch}},
        "additionalProperties": False,
    }


def request_body(content: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra=`` of a route that reads its body itself."""
    return {"requestBody": {"required": True, "content": content}}


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


#: Request options whose upper bound is a setting; the schema states the setting's value.
SETTING_MAXIMA = {
    "top_k": "max_top_k",
    "retrieve_k": "max_retrieve_k",
    "nprobe": "max_nprobe",
    "rerank_k": "max_rerank_k",
}


def _state_setting_maxima(node: Any, settings: Settings) -> None:
    """Put ``maximum`` on every integer schema of an option in SETTING_MAXIMA: body
    properties and query parameters alike (the check itself is LocateOptions.validate)."""

    def bound(schema: dict[str, Any], name: str) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "integer":
                branch["maximum"] = int(getattr(settings, SETTING_MAXIMA[name]))

    if isinstance(node, dict):
        props = node.get("properties")
        if isinstance(props, dict):
            for name in SETTING_MAXIMA.keys() & props.keys():
                bound(props[name], name)
        if node.get("in") == "query" and node.get("name") in SETTING_MAXIMA:
            bound(node.get("schema") or {}, node["name"])
        for value in node.values():
            _state_setting_maxima(value, settings)
    elif isinstance(node, list):
        for value in node:
            _state_setting_maxima(value, settings)


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """``app.openapi()``: the generated document, plus the schemas of the bodies the routes
    read themselves (Problem, LocateJSONRequest), the limits that are settings (``maximum``)
    and, with auth on, the security schemes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (Problem, LocateJSONRequest):
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            if settings.auth_enabled:
                schema["components"]["securitySchemes"] = {
                    "bearer": {"type": "http", "scheme": "bearer"},
                    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                }
            _state_setting_maxima(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
