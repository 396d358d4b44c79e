"""The OpenAPI 3.1 document of the public HTTP API, served at `/openapi.json`.

Written as data, from the code's own constants (property allowlists, transports, limits, the
lifecycle's states and end reasons, the error codes of `errors.ErrorCode`) so that it cannot drift
from what the handlers check; `tests/test_openapi.py` compares it with the app's routes and its
answers, `tests/test_schemathesis.py` fuzzes the app with it. The bot callbacks (`/internal/...`)
are private (the bot contract, docs/bot-contract.md) and the local mode's page is not an API:
neither is described as an operation, though the `Error` schema lists every code, theirs too.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from dispatcher.config import JWT_ALGORITHMS, Settings
from dispatcher.errors import ErrorCode
from dispatcher.http.proxy import METHODS
from dispatcher.http.sessions import MAX_IDEMPOTENCY_KEY, MAX_LIST_LIMIT
from dispatcher.openapi.enums import named
from dispatcher.openapi.operations import (
    Security,
    healthz_operation,
    list_operation,
    pipecat_cloud_start,
    proxy_operation,
    readyz_operation,
    session_operations,
    start_operation,
    webhook_operation,
)
from dispatcher.openapi.parts import json_answer
from dispatcher.openapi.schemas import schemas

OPENAPI_VERSION = "3.1.0"


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document of this dispatcher as configured (its regions, its auth)."""
    secured: Security = [{"bearerAuth": []}] if settings.auth == "jwt" else []
    open_: Security = []
    session_id = {
        "name": "session_id",
        "in": "path",
        "required": True,
        "description": "The session's id (`sessionId` of the start's answer).",
        "schema": {"type": "string", "minLength": 1, "maxLength": 64},
    }
    paths: dict[str, Any] = {
        "/start": {"post": start_operation(settings, secured, MAX_IDEMPOTENCY_KEY)},
        "/v1/public/{agent}/start": {
            "post": pipecat_cloud_start(start_operation(settings, secured, MAX_IDEMPOTENCY_KEY))
        },
        "/sessions": {"get": list_operation(secured, MAX_LIST_LIMIT)},
        "/sessions/{session_id}": session_operations(session_id, secured),
        "/sessions/{session_id}/{path}": {
            method.lower(): proxy_operation(method, session_id, secured) for method in METHODS
        },
        "/healthz": {"get": healthz_operation(open_)},
        "/readyz": {"get": readyz_operation(open_)},
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": open_,
                "responses": {"200": json_answer("The OpenAPI document.", {"type": "object"})},
            }
        },
    }
    if settings.daily_webhook_secret is not None:
        # Served only when webhooks are configured.
        paths["/webhooks/daily"] = {"post": webhook_operation(open_)}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pipecat-fly-dispatcher",
            "version": _version(),
            "description": (
                "A VM-per-session dispatcher for Pipecat voice bots on Fly.io Machines. Every "
                'answer is JSON, errors included: `{"detail": "<human text>", "code": '
                '"<stable-code>", "error": "<the same text>"}`; the `Error` schema lists every '
                "code with the statuses it comes with, and an unexpected failure is 500 "
                f"{named(ErrorCode.INTERNAL_ERROR)}."
            ),
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": (
                        f"`Authorization: Bearer <JWT>`, signed {'/'.join(JWT_ALGORITHMS)} "
                        "(HS256 with `JWT_SECRET`, RS256/ES256 with a key of `JWT_JWKS_URL`; "
                        "the token's `alg` must be in `JWT_ALGORITHMS`). `exp` and `sub` are "
                        "required (`sub` is the user), `aud`/`iss` checked when configured. "
                        f"A token whose `role` is `{settings.jwt_admin_role}` (or whose `roles` "
                        "list holds it) is an admin's."
                    ),
                }
            },
            "schemas": schemas(settings),
        },
    }


def _version() -> str:
    try:
        return importlib.metadata.version("pipecat-fly-dispatcher")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
