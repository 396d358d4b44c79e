"""`/openapi.json`: a valid OpenAPI 3.1 document that describes every public route and nothing
else, and that the dispatcher's real answers match."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

from dispatcher.app import create_app
from dispatcher.config import Settings
from dispatcher.openapi import openapi_document
from dispatcher.rooms.daily import ROOM_PROPERTIES, TOKEN_PROPERTIES
from dispatcher.store import Session
from testkit.harness import JWT_SECRET, Stack, dispatcher_env, dispatcher_stack

# Routes that are not part of the public API: the bots' callbacks, local mode's page, and the
# Prometheus scrape (on the internal listener).
PRIVATE_PREFIXES = ("/internal/",)
PRIVATE_PATHS = ("/", "/web", "/metrics")
WEBHOOK_SECRET = base64.b64encode(b"webhook-secret-" + b"w" * 17).decode()
FLY_ENV = dispatcher_env(
    fly_url="http://127.0.0.1:1",
    daily_url="http://127.0.0.1:2",
    dispatcher_url="http://127.0.0.1:7860",
    db="sqlite:///unused.db",
) | {"DAILY_WEBHOOK_SECRET": WEBHOOK_SECRET}
SETTINGS = {
    "fly": FLY_ENV,
    "local": {},
    "local-jwt": {"JWT_SECRET": JWT_SECRET, "DAILY_API_KEY": "k" * 40},
}


def admin_headers(user: str = "admin-1") -> dict[str, str]:
    token = jwt.encode(
        {"sub": user, "role": "admin", "exp": int(time.time()) + 600}, JWT_SECRET, "HS256"
    )
    return {"Authorization": f"Bearer {token}"}


def validator(document: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Validator:
    """A JSON Schema 2020-12 validator for `schema`, whose refs point into the document."""
    root = {"components": document["components"], **schema}
    return jsonschema.Draft202012Validator(
        root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def answer_schema(document: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    answer = document["paths"][path][method]["responses"][str(status)]
    return dict(answer["content"]["application/json"]["schema"])


def check_answer(document: dict[str, Any], path: str, method: str, response: Any) -> None:
    """The response's status is documented for the operation and its body matches."""
    assert str(response.status_code) in document["paths"][path][method]["responses"], (
        f"{method.upper()} {path}: {response.status_code} is not documented"
    )
    assert response.headers["content-type"].startswith("application/json")
    schema = answer_schema(document, path, method, response.status_code)
    validator(document, schema).validate(response.json())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_document_is_valid_openapi_3_1(name: str) -> None:
    """The document passes the OpenAPI 3.1 validator, for each kind of configuration."""
    document = openapi_document(Settings.from_env(SETTINGS[name]))
    assert document["openapi"].startswith("3.1.")
    validate(document)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_public_route_is_described_and_nothing_else(name: str) -> None:
    """The paths and methods described are exactly those of the app's public routes."""
    settings = Settings.from_env(SETTINGS[name])
    app = create_app(settings)
    served: set[tuple[str, str]] = set()
    for route in app.routes:
        if not isinstance(route, Route):
            continue  # the page's assets (/web), mounted in local mode
        if route.path.startswith(PRIVATE_PREFIXES) or route.path in PRIVATE_PATHS:
            continue
        path = route.path.replace("{path:path}", "{path}")
        served |= {(path, m.lower()) for m in route.methods or () if m != "HEAD"}
    document = openapi_document(settings)
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == served


def test_security_follows_the_auth_mode() -> None:
    """With JWT auth the client routes need the bearer token; without auth nothing does."""
    with_jwt = openapi_document(Settings.from_env(FLY_ENV))
    assert with_jwt["paths"]["/start"]["post"]["security"] == [{"bearerAuth": []}]
    assert with_jwt["paths"]["/healthz"]["get"]["security"] == []
    scheme = with_jwt["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["scheme"] == "bearer" and scheme["bearerFormat"] == "JWT"
    without = openapi_document(Settings.from_env({}))
    assert without["paths"]["/start"]["post"]["security"] == []


def test_the_webhook_is_described_when_it_is_served() -> None:
    """POST /webhooks/daily exists (and is described) only with DAILY_WEBHOOK_SECRET."""
    with_secret = openapi_document(Settings.from_env(FLY_ENV))
    webhook = with_secret["paths"]["/webhooks/daily"]["post"]
    assert webhook["security"] == []
    assert [p["name"] for p in webhook["parameters"]] == [
        "X-Webhook-Signature",
        "X-Webhook-Timestamp",
    ]
    env = {k: v for k, v in FLY_ENV.items() if k != "DAILY_WEBHOOK_SECRET"}
    assert "/webhooks/daily" not in openapi_document(Settings.from_env(env))["paths"]


def test_the_start_request_comes_from_the_code() -> None:
    """The property allowlists, transports and regions are the code's and the settings'."""
    document = openapi_document(Settings.from_env(FLY_ENV))
    request = document["components"]["schemas"]["StartRequest"]["properties"]
    assert set(request["dailyRoomProperties"]["properties"]) == set(ROOM_PROPERTIES)
    assert request["dailyRoomProperties"]["additionalProperties"] is False
    assert set(request["dailyMeetingTokenProperties"]["properties"]) == set(TOKEN_PROPERTIES)
    assert request["transport"]["enum"] == ["daily", "webrtc"]
    assert request["region"]["enum"] == ["iad", "ord"]
    start = document["paths"]["/start"]["post"]
    assert {"400", "401", "409", "413", "422", "429", "502", "503", "504"} <= set(
        start["responses"]
    )
    assert start["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    assert [p["name"] for p in start["parameters"]] == ["Idempotency-Key"]


def test_errors_are_described_with_error_beside_detail_and_code() -> None:
    """The Error schema (and readyz's 503) require `error`, the key the pipecatcloud SDK reads,
    and the Pipecat Cloud path is the start operation under another path."""
    document = openapi_document(Settings.from_env(FLY_ENV))
    error = document["components"]["schemas"]["Error"]
    assert error["required"] == ["detail", "code", "error"]
    readyz = answer_schema(document, "/readyz", "get", 503)
    assert {"detail", "code", "error"} <= set(readyz["required"])
    pcc = document["paths"]["/v1/public/{agent}/start"]["post"]
    start = document["paths"]["/start"]["post"]
    assert pcc["responses"] == start["responses"] and pcc["requestBody"] == start["requestBody"]
    assert [p["name"] for p in pcc["parameters"]] == ["agent", "Idempotency-Key"]


def test_the_session_schema_is_session_public() -> None:
    """The Session schema lists exactly the keys of Session.public(), all required."""
    schema = openapi_document(Settings.from_env({}))["components"]["schemas"]["Session"]
    now = time.time()
    session = Session(
        id="s-0123456789abcdef",
        user_id="user-1",
        state="ready",
        transport="daily",
        dispatcher="d",
        created_at=now,
        updated_at=now,
        expires_at=now + 60,
    )
    assert set(schema["properties"]) == set(session.public()) == set(schema["required"])


@pytest.fixture
async def stack(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with dispatcher_stack(tmp_path) as running:
        yield running


async def served_document(stack: Stack) -> dict[str, Any]:
    response = await stack.http.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = dict(response.json())
    assert document == openapi_document(stack.settings)
    return document


async def test_real_answers_match_the_document(stack: Stack) -> None:
    """A daily start, the session read, listed and ended, errors and health: as documented."""
    document = await served_document(stack)
    started = await stack.start({"hello": "world"}, region="ord")
    check_answer(document, "/start", "post", started)
    sid = started.json()["sessionId"]
    ready = await stack.wait_state(sid, "ready")
    validator(document, {"$ref": "#/components/schemas/Session"}).validate(ready)
    got = await stack.http.get(f"/sessions/{sid}", headers=stack.headers())
    check_answer(document, "/sessions/{session_id}", "get", got)
    listed = await stack.http.get("/sessions", params={"limit": 5}, headers=admin_headers())
    check_answer(document, "/sessions", "get", listed)
    assert [s["sessionId"] for s in listed.json()["sessions"]] == [sid]
    ended = await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
    check_answer(document, "/sessions/{session_id}", "delete", ended)
    final = await stack.wait_state(sid, "ended")
    validator(document, {"$ref": "#/components/schemas/Session"}).validate(final)
    errors = [
        ("/start", "post", await stack.http.post("/start", json={"region": "syd"})),
        (
            "/start",
            "post",
            await stack.http.post(
                "/start", json={"dailyRoomProperties": {"exp": 1}}, headers=stack.headers()
            ),
        ),
        (
            "/sessions/{session_id}",
            "get",
            await stack.http.get("/sessions/s-nope", headers=stack.headers()),
        ),
        ("/sessions", "get", await stack.http.get("/sessions", headers=stack.headers())),
        # "²" is a digit to str.isdigit() but not to int(): 400, not 500.
        (
            "/sessions",
            "get",
            await stack.http.get("/sessions", params={"limit": "²"}, headers=admin_headers()),
        ),
        (
            "/sessions",
            "get",
            await stack.http.get(
                "/sessions", params={"limit": "9" * 5000}, headers=admin_headers()
            ),
        ),
        (
            "/sessions/{session_id}/{path}",
            "post",
            await stack.http.post(f"/sessions/{sid}/api/offer", headers=stack.headers()),
        ),
    ]
    for path, method, response in errors:
        assert response.status_code >= 400
        check_answer(document, path, method, response)
    check_answer(document, "/healthz", "get", await stack.http.get("/healthz"))
    check_answer(document, "/readyz", "get", await stack.http.get("/readyz"))


async def test_a_session_with_the_bots_error_matches_the_document(stack: Stack) -> None:
    """A session whose bot reported a (long) error is answered, read and listed, as documented."""
    document = await served_document(stack)
    started = await stack.start({"testBot": {"skip_ready": True, "no_ended": True}})
    sid = started.json()["sessionId"]
    ended = await stack.bot_ended(sid, reason="crashed", exit_code=1, error="E" * 5000)
    assert ended.status_code == 200, ended.text
    got = await stack.http.get(f"/sessions/{sid}", headers=stack.headers())
    check_answer(document, "/sessions/{session_id}", "get", got)
    assert got.json()["error"] == "E" * 1000
    listed = await stack.http.get("/sessions", headers=admin_headers())
    check_answer(document, "/sessions", "get", listed)
    assert [s["error"] for s in listed.json()["sessions"]] == ["E" * 1000]


async def test_a_webrtc_start_matches_the_document(tmp_path: Path) -> None:
    """A webrtc session's answer (local bots) is the documented webrtc answer."""
    async with dispatcher_stack(tmp_path, local=True) as stack:
        document = await served_document(stack)
        started = await stack.start(transport="webrtc", createDailyRoom=None)
        check_answer(document, "/start", "post", started)
        assert set(started.json()) == {"sessionId", "iceConfig"}
        sid = started.json()["sessionId"]
        await stack.http.delete(f"/sessions/{sid}", headers=stack.headers())
        await stack.wait_state(sid, "ended", "failed")
