"""Requests checked against Fly's published OpenAPI document, as the Machines API checks them.

The document is `tests/reference/fly-machines-openapi.json` (its source: the README beside it,
and its `info.x-source`). A request it rejects gets Fly's 400, `{"error": "<what is wrong>"}`:
a path and method it lists with a query parameter of the wrong type (booleans as Go's
`strconv.ParseBool` reads them, integers as whole numbers) or outside its enum (`state` of a
wait also as a comma list or repeated), or a body that its schema refuses (a missing required
body, a wrong type, a value outside an enum). Integers are JSON numbers without a fraction, as
Go decodes them (JSON Schema draft 4's rule).

What the document leaves open stays open: none of its schemas sets `additionalProperties:
false`, so an unknown field is no error (Fly's Go server ignores unknown JSON fields [inf]),
nor is an unknown query parameter; parts marked `x-not-transcribed` are checked for their JSON
type only. Such fields are listed by `undeclared` instead, for tests of the client's requests.
Paths the document lacks (`/v1/platform/regions`) are not checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry
from referencing.jsonschema import DRAFT4

SPEC_PATH = (
    Path(__file__).resolve().parents[3] / "tests" / "reference" / "fly-machines-openapi.json"
)
_SPEC_URI = "urn:fly-machines-openapi"
_GO_BOOLS = frozenset(
    {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
)
_INTEGER = re.compile(r"[+-]?\d+")


class SpecViolation(ValueError):
    """A request the OpenAPI document rejects; the message says what is wrong."""


@dataclass(frozen=True)
class Operation:
    """One method on one path of the document."""

    method: str
    template: str
    pattern: re.Pattern[str]
    spec: dict[str, Any]

    @property
    def route(self) -> str:
        """`METHOD /path/{template}`, for messages."""
        return f"{self.method} {self.template}"


class OpenAPIRequests:
    """The document's operations, and the checks of one request against them."""

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.spec = spec if spec is not None else json.loads(SPEC_PATH.read_text())
        self._registry: Registry[Any] = Registry().with_resource(
            _SPEC_URI, DRAFT4.create_resource(self.spec)
        )
        self._operations = sorted(
            (
                Operation(method.upper(), template, _path_pattern(template), op)
                for template, methods in self.spec["paths"].items()
                for method, op in methods.items()
            ),
            key=lambda o: -o.template.count("/"),
        )
        self._validators: dict[str, jsonschema.Draft4Validator] = {}

    def operation(self, method: str, path: str) -> Operation | None:
        """The document's operation for a request, or None when it has none."""
        return next(
            (o for o in self._operations if o.method == method and o.pattern.fullmatch(path)),
            None,
        )

    def check(
        self, op: Operation, query: Iterable[tuple[str, str]], body: Any, has_body: bool
    ) -> list[str]:
        """Raise SpecViolation if the document rejects the request; else the fields it sent that
        the document does not declare (where its schemas are open), as dotted paths."""
        self._check_query(op, list(query))
        request_body = op.spec.get("requestBody")
        if request_body is None:
            return []
        if not has_body:
            if request_body.get("required"):
                raise SpecViolation("invalid request body: a JSON body is required")
            return []
        schema = request_body["content"]["application/json"]["schema"]
        # Into the document by an absolute reference, so that its own `#/...` ones resolve.
        pointer = "/".join(
            part.replace("~", "~0").replace("/", "~1")
            for part in ("paths", op.template, op.method.lower(), "requestBody", "content")
        )
        validator = self._validators.get(op.route)
        if validator is None:
            root = {"$ref": f"{_SPEC_URI}#/{pointer}/application~1json/schema"}
            validator = jsonschema.Draft4Validator(root, registry=self._registry)
            self._validators[op.route] = validator
        errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if errors:
            raise SpecViolation(f"invalid request body: {_describe(errors[0])}")
        return list(self._undeclared(body, schema, ""))

    def _check_query(self, op: Operation, query: list[tuple[str, str]]) -> None:
        params = {p["name"]: p for p in op.spec.get("parameters", []) if p.get("in") == "query"}
        for name, value in query:
            param = params.get(name)
            if param is None:
                continue  # undeclared query parameters are ignored; metadata.{key} is a string
            schema = param.get("schema", {})
            values = value.split(",") if "enum" in schema else [value]
            for item in values:
                if not _query_value_ok(item, schema):
                    raise SpecViolation(f"invalid {name} {value!r}: {_expected(schema)}")

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self._registry.resolver(_SPEC_URI).lookup(schema["$ref"]).contents
        return schema

    def _undeclared(self, value: Any, schema: dict[str, Any], path: str) -> Iterable[str]:
        """Keys of `value` no schema part declares, where the schema is open and detailed."""
        schema = self._resolve(schema)
        if "x-not-transcribed" in schema:
            return
        parts = [schema, *(self._resolve(s) for s in schema.get("allOf", []))]
        if isinstance(value, dict):
            declared: dict[str, dict[str, Any]] = {}
            for part in parts:
                declared |= part.get("properties", {})
            extra = next(
                (p["additionalProperties"] for p in parts if "additionalProperties" in p), None
            )
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if key in declared:
                    yield from self._undeclared(item, declared[key], where)
                elif isinstance(extra, dict):
                    yield from self._undeclared(item, extra, where)
                elif extra is None and declared:
                    yield where
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                yield from self._undeclared(item, schema["items"], f"{path}[{index}]")


def _path_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


def _query_value_ok(value: str, schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind == "boolean":
        ok = value in _GO_BOOLS
    elif kind == "integer":
        ok = _INTEGER.fullmatch(value) is not None
    else:
        ok = True
    return ok and ("enum" not in schema or value in schema["enum"])


def _expected(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "want one of " + ", ".join(schema["enum"])
    return f"want {'a' if schema.get('type') != 'integer' else 'an'} {schema.get('type')}"


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "body"
    return f"{where}: {error.message}"
