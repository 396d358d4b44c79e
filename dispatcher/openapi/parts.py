"""The pieces every part of the OpenAPI document is made of: references to its schemas, JSON
answers, and error answers with the codes each status carries."""

from __future__ import annotations

from typing import Any

JSON = "application/json"
_REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    """A reference to a schema of the document's components."""
    return {"$ref": _REF + name}


def json_answer(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An answer whose JSON body matches `schema`."""
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


# The codes each status can carry, for the operations that do not say more.
_DEFAULT_CODES = {
    400: "a bad request",
    401: "`missing-credentials`, `invalid-token`, `token-expired`",
    403: "`admin-required`",
    404: "`not-found`",
    409: "a conflict",
    410: "`session-ended`, `bot-gone`",
    413: "`payload-too-large`",
    422: "`idempotency-key-reused`",
    429: "`rate-limited`, `at-capacity`, `user-at-capacity`, `queue-full`",
    502: "`upstream-error`",
    503: "`jwks-unavailable` (the identity provider's keys are unreachable)",
    504: "`upstream-timeout`",
}
# Statuses whose answers always carry Retry-After, and those whose answers may.
_RETRY_AFTER_ALWAYS = {429}
_RETRY_AFTER_SOMETIMES = {409, 503}


def error_answers(*statuses: int | tuple[int, str]) -> dict[str, Any]:
    """Error answers: a status alone (its default codes) or (status, description)."""
    answers: dict[str, Any] = {}
    for entry in statuses:
        status, codes = entry if isinstance(entry, tuple) else (entry, _DEFAULT_CODES[entry])
        answer = json_answer(f"Error: {codes}.", ref("Error"))
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
