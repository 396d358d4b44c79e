"""Request input on every route: bodies read within a size limit and parsed as JSON within a
depth limit, integer query values; every refusal is a 4xx JSON answer, never a 500."""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from dispatcher.auth import derived_callback_token
from dispatcher.errors import BadRequest
from dispatcher.http.input import MAX_JSON_DEPTH, json_object, parse_json, whole_number
from dispatcher.store import AVAILABLE, PoolRows, Store
from dispatcher.webhooks import sign
from testkit.harness import JWT_SECRET, Stack, dispatcher_stack
from testkit.waits import eventually

# 4 KB of nested arrays: past the interpreter's recursion limit, within every route's size limit.
NESTED = b"[" * 2048 + b"]" * 2048
WEBHOOK_KEY = bytes(range(32))
ENV = {
    "DAILY_WEBHOOK_SECRET": base64.b64encode(WEBHOOK_KEY).decode(),
    "POOL_SIZE": "1",
    "POOL_INTERVAL_S": "60",
    "FLY_REGION": "iad",
}
# A bot that calls neither ready nor ended: the test sends its callbacks.
SILENT_BOT = {"testBot": {"skip_ready": True, "no_ended": True}}


def admin_headers() -> dict[str, str]:
    token = jwt.encode(
        {"sub": "admin-1", "role": "admin", "exp": int(time.time()) + 600}, JWT_SECRET, "HS256"
    )
    return {"Authorization": f"Bearer {token}"}


def webhook_headers(raw: bytes) -> dict[str, str]:
    ts = str(int(time.time()))
    return {"X-Webhook-Timestamp": ts, "X-Webhook-Signature": sign(WEBHOOK_KEY, ts, raw)}


@contextlib.contextmanager
def uvicorn_errors_captured(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Also capture uvicorn's own error log (it does not propagate), where an exception that
    escapes the app is written."""
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


async def pool_session(stack: Stack) -> tuple[str, str, str]:
    """A session on the warm pool's machine: its id, the machine's pool token and the
    session's callback token."""
    assert stack.fly is not None
    available: list[str] = []

    async def pool_ready() -> bool:
        nonlocal available
        store = await Store.open(stack.settings.database_url)
        try:
            rows = await PoolRows(store, stack.settings.dispatcher_name).all()
        finally:
            await store.close()
        available = [r.machine_id for r in rows if r.state == AVAILABLE]
        return bool(available)

    await eventually(pool_ready, timeout=20, what="an available pool machine")
    (machine_id,) = available
    pool_token = stack.fly.machines[machine_id].config["env"]["POOL_TOKEN"]
    started = await stack.start(SILENT_BOT)
    assert started.status_code == 200, started.text
    sid = started.json()["sessionId"]
    assert (await stack.session(sid))["machineId"] == machine_id

    async def assigned() -> bool:
        store = await Store.open(stack.settings.database_url)
        try:
            return any(e.kind == "assigned" for e in await store.events(sid))
        finally:
            await store.close()

    # The session's callback token is the one its assignment carries.
    await eventually(assigned, timeout=20, what="the pool bot fetching its assignment")
    return sid, pool_token, derived_callback_token(pool_token, sid)[0]


@pytest.mark.parametrize("authenticated", [False, True], ids=["unauthenticated", "authenticated"])
async def test_nested_arrays_are_4xx_json_on_every_route(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, authenticated: bool
) -> None:
    """4 KB of nested arrays as the body of every route that reads one (and as the integer
    query values), with and without credentials: a 4xx JSON error, and no traceback logged."""
    async with dispatcher_stack(tmp_path, env=ENV) as stack:
        sid, pool_token, callback_token = await pool_session(stack)
        machine_id = (await stack.session(sid))["machineId"]
        nested = NESTED.decode()

        def auth(headers: dict[str, str]) -> dict[str, str]:
            return headers if authenticated else {}

        bot = auth({"Authorization": f"Bearer {callback_token}"})
        requests = {
            "start": ("POST", "/start", {}, auth(stack.headers())),
            "pipecat-cloud": ("POST", "/v1/public/my-agent/start", {}, auth(stack.headers())),
            "ready": ("POST", f"/internal/sessions/{sid}/ready", {}, bot),
            "ended": ("POST", f"/internal/sessions/{sid}/ended", {}, bot),
            "webhook": ("POST", "/webhooks/daily", {}, auth(webhook_headers(NESTED))),
            "proxy": ("POST", f"/sessions/{sid}/api/offer", {}, auth(stack.headers())),
            "assignment": (
                "GET",
                f"/internal/machines/{machine_id}/assignment",
                {"wait": nested},
                auth({"Authorization": f"Bearer {pool_token}"}),
            ),
            "list": ("GET", "/sessions", {"limit": nested}, auth(admin_headers())),
        }
        too_deep = (400, "json-too-deep")
        no_credentials = (401, "missing-credentials")
        expected = {
            "start": too_deep if authenticated else no_credentials,
            "pipecat-cloud": too_deep if authenticated else no_credentials,
            "ready": too_deep,
            "ended": too_deep,
            "webhook": too_deep if authenticated else (401, "invalid-signature"),
            "proxy": (404, "no-bot-routes") if authenticated else no_credentials,
            "assignment": (400, "invalid-wait"),
            "list": (400, "invalid-limit") if authenticated else no_credentials,
        }
        answers: dict[str, tuple[int, str]] = {}
        with uvicorn_errors_captured(caplog), caplog.at_level(logging.WARNING):
            for name, (method, path, params, headers) in requests.items():
                content = NESTED if method == "POST" else None
                response = await stack.http.request(
                    method,
                    path,
                    params=params,
                    content=content,
                    headers=headers | {"Content-Type": "application/json"},
                )
                try:
                    answers[name] = (response.status_code, response.json()["code"])
                except (ValueError, KeyError):
                    answers[name] = (response.status_code, response.text[:80])
        assert answers == expected
        logged = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
        assert logged == [], [r.getMessage() for r in logged]
        assert (await stack.session(sid))["state"] == "dispatched"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{oops", "invalid-json"),
        (b"\xff\xfe{", "invalid-json"),
        (b"1" * 5000, "invalid-json"),
        (b"[" * 100_000 + b"]" * 100_000, "json-too-deep"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "json-too-deep"),
    ],
    ids=["not-json", "not-utf8", "too-many-digits", "past-the-recursion-limit", "past-the-limit"],
)
def test_bad_json_is_400_with_a_code(raw: bytes, code: str) -> None:
    """Text that is not JSON, or JSON nested past the limit (however deep), is 400 with its code."""
    with pytest.raises(BadRequest) as caught:
        parse_json(raw)
    assert caught.value.code == code


def test_the_depth_limit_is_the_callers() -> None:
    """A value nested exactly to the limit parses; one level more is json-too-deep."""
    assert parse_json(b"[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(BadRequest) as caught:
        parse_json(b"[[[[1]]]]", max_depth=3)
    assert caught.value.code == "json-too-deep"


def test_a_json_object_or_nothing() -> None:
    """An empty body is `{}`; any JSON other than an object is invalid-json."""
    assert json_object(b"") == {} and json_object(b" \n") == {}
    assert json_object(b'{"a": [1]}') == {"a": [1]}
    for raw in (b"[]", b'"text"', b"null", b"1"):
        with pytest.raises(BadRequest) as caught:
            json_object(raw)
        assert caught.value.code == "invalid-json"


@pytest.mark.parametrize(
    ("given", "parsed"),
    [(None, 25), ("0", 0), ("7", 7), ("30", 30), ("007", 7)],
)
def test_whole_numbers_in_range(given: str | None, parsed: int) -> None:
    """ASCII digits within the range parse; an absent value is the default."""
    assert whole_number(given, name="wait", minimum=0, maximum=30, default=25, code="c") == parsed


@pytest.mark.parametrize(
    "given", ["", "-1", "31", "1.5", " 7", "²", "٣", "1e3", "9" * 5000, NESTED.decode()]
)
def test_other_values_are_400_naming_the_parameter(given: str) -> None:
    """Signs, fractions, spaces, non-ASCII digits, huge or nested values: 400 with the caller's
    code, naming the parameter and its range."""
    with pytest.raises(BadRequest) as caught:
        whole_number(given, name="wait", minimum=0, maximum=30, default=25, code="invalid-wait")
    assert caught.value.code == "invalid-wait"
    assert "wait" in caught.value.detail and "0" in caught.value.detail
    assert "30" in caught.value.detail
