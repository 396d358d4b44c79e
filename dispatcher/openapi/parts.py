"""The pieces every part of the OpenAPI document is made of: references to its schemas, JSON
answers, and error answers with the codes each status carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dispatcher.errors import ErrorCode as C
from dispatcher.openapi.enums import named

JSON = "application/json"
_REF = "#/components/schemas/"

# A code an error answer carries, alone or with when it comes.
Listed = C | tuple[C, str]


def ref(name: str) -> dict[str, str]:
    """A reference to a schema of the document's components."""
    return {"$ref": _REF + name}


def json_answer(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An answer whose JSON body matches `schema`."""
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


# The codes each status carries, for the operations that do not say more.
_DEFAULT_CODES: dict[int, tuple[Listed, ...]] = {
    401: (C.MISSING_CREDENTIALS, C.INVALID_TOKEN, C.TOKEN_EXPIRED),
    410: (C.SESSION_ENDED, C.BOT_GONE),
    429: (C.RATE_LIMITED, C.AT_CAPACITY, C.USER_AT_CAPACITY, C.QUEUE_FULL),
    503: ((C.JWKS_UNAVAILABLE, "the identity provider's keys are unreachable"),),
}
# Statuses whose answers always carry Retry-After, and those whose answers may.
_RETRY_AFTER_ALWAYS = {429}
_RETRY_AFTER_SOMETIMES = {409, 503}


def error_answers(*entries: int | tuple[int, Sequence[Listed]]) -> dict[str, Any]:
    """Error answers: a status alone (its default codes) or (status, the codes it carries)."""
    answers: dict[str, Any] = {}
    for entry in entries:
        status, listed = (entry, _DEFAULT_CODES[entry]) if isinstance(entry, int) else entry
        answer = json_answer(f"Error: {_prose(listed)}.", error_schema(listed))
        if status in _RETRY_AFTER_ALWAYS or status in _RETRY_AFTER_SOMETIMES:
            answer["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again.",
                    "required": status in _RETRY_AFTER_ALWAYS,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                }
            }
        answers[str(status)] = answer
    return answers


def error_schema(listed: Sequence[Listed]) -> dict[str, Any]:
    """An error whose `code` is one of `listed`."""
    codes = [_code(item).value for item in listed]
    return {"allOf": [ref("Error"), {"properties": {"code": {"enum": codes}}}]}


def _code(item: Listed) -> C:
    return item if isinstance(item, C) else item[0]


def _prose(listed: Sequence[Listed]) -> str:
    return ", ".join(
        named(item) if isinstance(item, C) else f"{named(item[0])} ({item[1]})" for item in listed
    )
