"""`/openapi.json`: a valid OpenAPI 3.1 document that describes every public route and nothing
else, and that the dispatcher's real answers match."""

from __future__ import annotations

import ast
import base64
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import pytest
from openapi_spec_validator import validate
from starlette.routing import Route

import dispatcher
import dispatcher.errors
from dispatcher.app import create_app
from dispatcher.config import Settings
from dispatcher.errors import DispatcherError, ErrorCode, http_status
from dispatcher.lifecycle import END_REASON_VALUES, STATE_VALUES
from dispatcher.openapi.document import openapi_document
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
    "fly-pool": FLY_ENV | {"POOL_SIZE": "1", "CORS_ORIGINS": "https://app.example"},
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


def test_session_states_come_from_one_place() -> None:
    """The session's `state` and the list's `state` filter both take their enum from
    `dispatcher.lifecycle`."""
    document = openapi_document(Settings.from_env(FLY_ENV))
    session = document["components"]["schemas"]["Session"]["properties"]
    assert session["state"]["enum"] == list(STATE_VALUES)
    (state,) = [
        p for p in document["paths"]["/sessions"]["get"]["parameters"] if p["name"] == "state"
    ]
    assert state["schema"]["enum"] == list(STATE_VALUES)


def test_the_document_does_not_import_the_app() -> None:
    """Making the document imports neither the app nor the route table: no import cycle."""
    code = (
        "import sys; from dispatcher.config import Settings; "
        "from dispatcher.openapi.document import openapi_document; "
        "openapi_document(Settings()); "
        "print([m for m in ('dispatcher.app', 'dispatcher.http.routes') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# How the document's prose names an error code: a kebab-case word in backticks.
PROSE_CODE = re.compile(r"`([a-z]+(?:-[a-z]+)+)`")
# An error answer's description names nothing else in backticks: any such word is a code.
ANSWER_CODE = re.compile(r"`([a-z]+(?:-[a-z]+)*)`")


def walk(node: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v, k)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def schema_values(schema: dict[str, Any]) -> set[str]:
    """The values a schema names: its `enum`, its `const`s, and those of its `anyOf`/`oneOf`."""
    values = set(schema.get("enum", ()))
    values |= {schema["const"]} if "const" in schema else set()
    for branch in (*schema.get("anyOf", ()), *schema.get("oneOf", ())):
        values |= schema_values(branch)
    return values - {None}


def named_in(document: dict[str, Any]) -> dict[str, set[str]]:
    """The states, end reasons and error codes the document names, wherever it names them:
    schemas of `state`, `endReason` and `code` properties (and the `state` parameter), and codes
    in its prose."""
    named: dict[str, set[str]] = {"state": set(), "endReason": set(), "code": set()}
    for key, value in walk(document):
        if key == "properties":
            for name in named.keys() & value.keys():
                named[name] |= schema_values(value[name])
        elif isinstance(value, dict) and value.get("in") == "query" and value["name"] == "state":
            named["state"] |= schema_values(value["schema"])
        elif isinstance(value, str):
            named["code"] |= set(PROSE_CODE.findall(value))
    return named


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_state_end_reason_and_error_code_is_named_and_nothing_else(name: str) -> None:
    """The document names every state, every end reason and every error code of the code, and
    no other: its enums, its `code` schemas and the codes in its prose are the registries'."""
    named = named_in(openapi_document(Settings.from_env(SETTINGS[name])))
    assert named["state"] == set(STATE_VALUES)
    assert named["endReason"] == set(END_REASON_VALUES)
    assert named["code"] == {code.value for code in ErrorCode}


def test_the_error_schema_is_the_registry() -> None:
    """The Error schema's `code` is every ErrorCode member, in order, with its statuses and
    meaning."""
    document = openapi_document(Settings.from_env(SETTINGS["fly-pool"]))
    codes = document["components"]["schemas"]["Error"]["properties"]["code"]["oneOf"]
    assert [c["const"] for c in codes] == [code.value for code in ErrorCode]
    for entry, code in zip(codes, ErrorCode, strict=True):
        assert entry["description"].endswith(code.meaning)
        assert all(str(status) in entry["description"] for status in code.statuses)


def error_answers(document: dict[str, Any]) -> Iterator[tuple[str, int, list[str], str]]:
    """(operation, status, codes, description) of every error answer that lists its codes."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, answer in operation["responses"].items():
                if not status.isdigit() or int(status) < 400:
                    continue
                schema = answer["content"]["application/json"]["schema"]
                codes = sorted(schema_values(next(iter(walk_code_schemas(schema)))))
                yield f"{method.upper()} {path}", int(status), codes, answer["description"]


def walk_code_schemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schemas of `code` within an answer's schema."""
    for key, value in walk(schema):
        if key == "properties" and "code" in value:
            yield value["code"]


def test_each_error_answer_lists_codes_of_its_status() -> None:
    """Every error answer names, in its schema and its description, codes that come with its
    status, and only those."""
    document = openapi_document(Settings.from_env(SETTINGS["fly-pool"]))
    answers = list(error_answers(document))
    assert len(answers) > 30
    for operation, status, codes, description in answers:
        assert codes, f"{operation} {status} lists no code"
        for code in codes:
            assert status in ErrorCode(code).statuses, f"{operation}: {code} is not a {status}"
        assert sorted(ANSWER_CODE.findall(description)) == codes, f"{operation} {status}"


# The classes of dispatcher/errors.py, by name, and how a raise site names a member.
ERROR_CLASSES = {
    name: cls
    for name, cls in vars(dispatcher.errors).items()
    if isinstance(cls, type) and issubclass(cls, DispatcherError)
}


def error_calls() -> Iterator[tuple[str, type[DispatcherError], ast.expr | None]]:
    """Every construction of a dispatcher error in dispatcher/: (where, class, its `code=`)."""
    package = Path(dispatcher.__file__).parent
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                cls = ERROR_CLASSES.get(node.func.id)
                if cls is not None:
                    code = next((k.value for k in node.keywords if k.arg == "code"), None)
                    yield f"{source.relative_to(package)}:{node.lineno}", cls, code


def status_of(cls: type[DispatcherError]) -> int:
    return http_status(cls.__new__(cls))


def test_every_raise_names_a_registered_code_of_its_status() -> None:
    """Every error the dispatcher makes carries an ErrorCode member (never a string) whose
    statuses include its class's status: named at the raise, passed on from a parameter typed
    ErrorCode, or its class's own."""
    calls = list(error_calls())
    assert len(calls) > 60
    for where, cls, code in calls:
        if code is None:
            assert (
                cls is dispatcher.errors.ConfigError
                or "code" in vars(cls)
                or any("code" in vars(base) for base in cls.__mro__[1:] if base is not Exception)
            ), where
            member = cls.code
        elif isinstance(code, ast.Name):
            continue  # a parameter typed ErrorCode (mypy checks what its callers pass)
        else:
            assert isinstance(code, ast.Attribute) and ast.unparse(code.value) == "ErrorCode", (
                f"{where}: code={ast.unparse(code)} is not an ErrorCode member"
            )
            member = ErrorCode[code.attr]
        if cls is dispatcher.errors.ConfigError:
            continue  # raised at start-up, never answered
        assert not member.statuses or status_of(cls) in member.statuses, (
            f"{where}: {cls.__name__} answers {status_of(cls)}, {member} is {member.statuses}"
        )


def test_a_code_is_required_where_its_class_has_none() -> None:
    """The classes without a code of their own refuse to be made without one, and those with one
    answer with a code of their status."""
    for cls in ERROR_CLASSES.values():
        if "code" in vars(cls) or cls is DispatcherError:
            assert status_of(cls) in cls.code.statuses, cls.__name__
    with pytest.raises(TypeError):
        dispatcher.errors.BadRequest("no code")  # type: ignore[call-arg]


def test_the_http_api_page_lists_every_code_at_its_statuses() -> None:
    """docs/http-api.md's error table names every ErrorCode member in the row of each of its
    statuses, and no other code."""
    page = (Path(__file__).parents[1] / "docs" / "http-api.md").read_text()
    table = page[page.index("## Errors") : page.index("## Sessions and end reasons")]
    rows = {
        line.split("|")[1].strip(): set(ANSWER_CODE.findall(line.split("|")[2]))
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| status")
    }
    assert set().union(*rows.values()) == {code.value for code in ErrorCode}
    for code in ErrorCode:
        for status in code.statuses:
            assert code.value in rows[str(status)], f"{code} is not in the {status} row"
